"""Where a LoRA keeps the clicks' agreement: saved pair clicks replayed as click gradients at the base.

    python -m d3po_studio.bench.placement --workdir runs/all20 --variants db07f db07b \\
        --cells greener__n2__s1 greener__n2__s2 --placements attn1 attn2 ff conv proj temb --jobs 2

The evidence step (core/trust_region.py) opens once the unit click gradients agree beyond chance,
and the gradients live where the LoRA sits: the same click's step noise maps to different weights on
every prompt, and part of the clicks' agreement is lost on the way (bench/noise_agreement.py). This
replays each saved click of a pair cell (its trajectory and winner, from the session folder) through
the session's own objective (core/objectives.py, with the session's settings) on a fresh LoRA at
each placement, at the base (B = 0, where every session's first step is taken), and reads the
agreement of the unit gradients as ``bench/noise_agreement.py`` reads the noise's: z after 10, 25
and 50 clicks, the first click at z = 2, and z95 of the same clicks with random winners (random signs:
pairs only). For the clicks before a cell's first step the placement the cell ran reproduces the z
its rounds recorded. Writes the "placement" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from pathlib import Path

import numpy as np

from .agreement import z_score
from .noise_agreement import AT, FROM_CLICK, LEVEL, agreement_path, first_at
from .report import table, write_section

PLACEMENTS = {
    "attn1": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"),
    "attn2": ("attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),     # every attention projection (the default before the fifteenth session)
    "ff": ("ff.net.0.proj", "ff.net.2"),
    "conv": ("conv1", "conv2"),
    "proj": ("proj_in", "proj_out"),
    "temb": ("time_emb_proj",),
}
REPLICATES = 200


def replay_units(pipe, params, cell: Path, clicks: int = max(AT)) -> tuple[np.ndarray, list[dict]]:
    """The unit click gradients [k, P] of a pair cell's first ``clicks`` rounds at the LoRA's current
    weights, through the session's objective and settings; and the rounds' reports."""
    import torch
    from safetensors.torch import load_file

    from ..core.config import Settings
    from ..core.errors import ConfigError
    from ..core.loss import pairs_from_best
    from ..core.objectives import get_objective
    from ..core.sampling import Trajectory
    from ..core.trust_region import unit_gradient
    settings = Settings.from_dict(json.loads((cell / "session" / "session.json").read_text())["settings"])
    objective = get_objective(settings.objective)
    units, reports = [], []
    for index, path in enumerate(sorted((cell / "session" / "rounds").glob("*/round.json"))[:clicks]):
        r = json.loads(path.read_text())
        if r.get("n") != 2 or r.get("status") != "applied":
            raise ConfigError(f"{path}: only applied pair clicks can be replayed")
        traj = Trajectory.from_tensors(load_file(str(path.parent / "trajectory.safetensors")))
        for p in params:
            p.grad = None
        generator = torch.Generator("cpu").manual_seed(settings.seed * 1_000_003 + index)
        objective(pipe, traj, pairs_from_best(2, int(r["choice"]["best"])), settings,
                  device=pipe.unet.device, generator=generator, weight=1.0)
        unit = unit_gradient(params)
        units.append(unit.double().numpy() if unit is not None else np.zeros(sum(p.numel() for p in params)))
        reports.append(r.get("report") or {})
    return np.stack(units), reports


def placement_rows(placement: str, cells: list[Path], model: str = "embedded", clicks: int = max(AT),
                   replicates: int = REPLICATES, pipe=None, seed: int = 0) -> list[list[str]]:
    """One row per cell for one placement (a fresh pipeline with a rank-4 LoRA there, LoRA seed ``seed``)."""
    import torch

    from ..core.loading import load_pipeline
    from ..core.lora import add_lora
    torch.set_num_threads(1)
    pipe = pipe if pipe is not None else load_pipeline(model)
    params = add_lora(pipe.unet, 4, 4.0, PLACEMENTS[placement], seed=seed, adapter=f"placement_{placement}")
    rng = np.random.default_rng(0)
    rows = []
    for cell in cells:
        units, reports = replay_units(pipe, params, cell, clicks)
        path = agreement_path(units)
        z95 = float("nan")
        if len(units) >= FROM_CLICK + 1:     # the null needs two looks at least
            maxima = [np.nanmax(agreement_path(units * rng.choice([-1.0, 1.0], size=(len(units), 1)))[FROM_CLICK - 1:])
                      for _ in range(replicates)]
            z95 = float(np.quantile(maxima, 0.95))
        recorded = [z_score(r["evidence_power"], r["evidence_null_sd"]) if r.get("evidence_null_sd") else np.nan
                    for r in reports]
        _variant, chooser, _n, s = cell.name.split("__")
        shown = [f"{path[c - 1]:+.1f}" if c <= len(path) and np.isfinite(path[c - 1]) else "—" for c in AT]
        at25 = f"{recorded[24]:+.1f}" if len(recorded) >= 25 and np.isfinite(recorded[24]) else "—"
        rows.append([placement, chooser, s[1:], *shown, at25, str(first_at(path, LEVEL, FROM_CLICK) or "—"),
                     f"{z95:.1f}" if np.isfinite(z95) else "—",
                     str((np.isfinite(z95) and first_at(path, z95, FROM_CLICK)) or "—")])
    return rows


def _job(args):
    return placement_rows(*args)


def markdown(rows: list[list[str]], command: str) -> str:
    headers = (["placement", "chooser", "seed"] + [f"z @{c}" for c in AT]
               + ["recorded z @25", "first z ≥ 2", "z95", "first ≥ z95"])
    return "\n".join([
        "## Where the LoRA keeps the clicks' agreement", "",
        f"Command: `{command}`. Each saved pair click replayed through the session's objective on a fresh "
        "rank-4 LoRA at each placement, at the base (bench/placement.py): **z** = the agreement of the unit click "
        "gradients (as bench/agreement.py); **recorded** = the z the cell's own rounds recorded (its placement, "
        "at its weights of the time); **z95** = the level only 5% of the same clicks with random winners reach "
        f"from click {FROM_CLICK} on ({REPLICATES} sign flips).", "", table(headers, rows), ""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a folder of bench/learning.py cells")
    p.add_argument("--variants", nargs="+", required=True, help="the variants whose pair cells to replay")
    p.add_argument("--cells", nargs="*", default=[], help="only cells whose name ends so (e.g. greener__n2__s1)")
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--clicks", type=int, default=max(AT), help="the first clicks of each cell (default 50)")
    p.add_argument("--jobs", type=int, default=1, help="placements replayed at once, one process and thread each")
    p.add_argument("--docs", help="markdown file to write the section into (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="print only")
    a = p.parse_args(argv)
    cells = [c for c in sorted(Path(a.workdir).iterdir())
             if c.is_dir() and c.name.count("__") == 3 and c.name.split("__")[0] in a.variants
             and c.name.split("__")[2] == "n2" and (not a.cells or any(c.name.endswith(e) for e in a.cells))]
    if not cells:
        raise SystemExit(f"no pair cell of {a.variants} in {a.workdir}")
    model = json.loads((cells[0] / "session" / "session.json").read_text())["model"]
    work = [(placement, cells, model, a.clicks) for placement in a.placements]
    if a.jobs > 1:
        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            results = pool.map(_job, work)
    else:
        results = [_job(w) for w in work]
    rows = [row for result in results for row in result]
    command = (f"python -m d3po_studio.bench.placement --workdir {a.workdir} --variants {' '.join(a.variants)}"
               + (f" --cells {' '.join(a.cells)}" if a.cells else "") + f" --placements {' '.join(a.placements)}")
    text = markdown(rows, command)
    if not a.no_docs:
        write_section("placement", text, **({"path": a.docs} if a.docs else {}))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
