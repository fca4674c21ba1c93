"""Where a LoRA keeps the clicks' agreement: saved clicks replayed as click gradients at the base.

    python -m d3po_studio.bench.placement --workdir runs/all20 --variants db07f db07b \\
        --cells greener__n2__s1 warmer__n4__s2 --placements attn1 attn2 ff conv conv:r16 conv:s10 --jobs 2

The evidence step (core/trust_region.py) opens once the unit click gradients agree beyond chance,
and the gradients live where the LoRA sits: the same click's step noise maps to different weights on
every prompt, and part of the clicks' agreement is lost on the way (bench/noise_agreement.py). This
replays each saved click of a cell (its trajectory and winner, from the session folder; pairs or
best of N) through the session's own objective (core/objectives.py, with the session's settings) on
a fresh LoRA at each placement (rank 4 and seeded as the cell's session seeded its own, unless a
``--placements`` entry names a rank or LoRA seed: ``conv:r16:s10``), at the base (B = 0, where
every session's first step is taken), and reads the agreement of the unit gradients as
``bench/noise_agreement.py`` reads the noise's: z after 10, 25 and 50 clicks, the first click at
z = 2, and z95 of the same clicks with random winners: for pairs a random sign; a random winner of
N > 2 images is not a sign flip, so best of N has it only with ``--every-winner``, which replays
each click with each of its images the winner (N backward passes a click) and draws from those.
Every placement rides on one backward per click: each is its own adapter, all of them active, and
at B = 0 an adapter adds exactly nothing to the UNet's outputs, so each one's gradient is the one it
would get alone. For the clicks before a cell's first step the placement the cell ran reproduces
the z its rounds recorded. Writes the "placement" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from .agreement import z_score
from .noise_agreement import AT, FROM_CLICK, LEVEL, agreement_path, first_at
from .report import machine, table, write_section

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


def replay_units(pipe, groups: dict[str, list], cell: Path, clicks: int = max(AT), every_winner: bool = False
                 ) -> tuple[dict[str, np.ndarray], list[dict], list[int]]:
    """The unit click gradients [k, P] of a cell's first ``clicks`` rounds, one array per group of
    LoRA params in ``groups`` (all of them active on the UNet, each at B = 0, or a single group at
    any weights), through the session's objective and settings; the rounds' reports; and each
    click's winner. ``every_winner``: the unit gradient the click would have had with each of its N
    images the winner instead, [k, N, P] (N backward passes a click), for the null of random winners."""
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
    units: dict[str, list] = {name: [] for name in groups}
    reports, best = [], []
    for index, path in enumerate(sorted((cell / "session" / "rounds").glob("*/round.json"))[:clicks]):
        r = json.loads(path.read_text())
        if r.get("status") != "applied" or "best" not in (r.get("choice") or {}):
            raise ConfigError(f"{path}: only applied clicks with a best image can be replayed")
        traj = Trajectory.from_tensors(load_file(str(path.parent / "trajectory.safetensors")))
        n, winner = int(r["n"]), int(r["choice"]["best"])
        per_winner: dict[str, list[np.ndarray]] = {name: [] for name in groups}
        for w in (range(n) if every_winner else [winner]):
            for params in groups.values():
                for p in params:
                    p.grad = None
            generator = torch.Generator("cpu").manual_seed(settings.seed * 1_000_003 + index)
            objective(pipe, traj, pairs_from_best(n, w), settings, device=pipe.unet.device,
                      generator=generator, weight=1.0)
            for name, params in groups.items():
                unit = unit_gradient(params)
                per_winner[name].append(unit.double().numpy() if unit is not None
                                        else np.zeros(sum(p.numel() for p in params)))
        for name in groups:
            units[name].append(np.stack(per_winner[name]) if every_winner else per_winner[name][0])
        reports.append(r.get("report") or {})
        best.append(winner)
    return {name: np.stack(u) for name, u in units.items()}, reports, best


def random_winner_z95(alternatives: np.ndarray, replicates: int, rng) -> float:
    """z95 of the null of random winners: the level the agreement path of ``alternatives``
    ([k, N, P], each click's unit gradient for each possible winner) reaches from click FROM_CLICK
    on in only 5% of sessions whose every winner is drawn uniformly (pairs: a random sign)."""
    k, n = alternatives.shape[:2]
    maxima = [np.nanmax(agreement_path(alternatives[np.arange(k), rng.integers(0, n, size=k)])[FROM_CLICK - 1:])
              for _ in range(replicates)]
    return float(np.quantile(maxima, 0.95))


def lora_spec(spec: str) -> tuple[tuple[str, ...], int, int | None]:
    """A placement as ``--placements`` names it: ``NAME`` or ``NAME:rRANK:sSEED`` (either suffix
    optional; e.g. ``conv:r16``, ``conv:s10``) -> (its targets, its rank, its LoRA seed or None)."""
    name, *options = spec.split(":")
    if name not in PLACEMENTS:
        raise ValueError(f"placement {name!r} is unknown: use one of {sorted(PLACEMENTS)}")
    rank, seed = 4, None
    for option in options:
        if option[:1] == "r" and option[1:].isdigit() and int(option[1:]) > 0:
            rank = int(option[1:])
        elif option[:1] == "s" and option[1:].isdigit():
            seed = int(option[1:])
        else:
            raise ValueError(f"{spec!r}: after the placement, use :rRANK and :sSEED (e.g. conv:r16:s10)")
    return PLACEMENTS[name], rank, seed


def stacked_loras(pipe, placements: list[str], seed: int = 0) -> dict[str, list]:
    """A fresh LoRA at each placement (``lora_spec``: rank 4 and LoRA seed ``seed`` unless the spec
    says otherwise; α = rank, so α/r = 1 as the default's), every one of them active at once."""
    from ..core.lora import add_lora
    groups = {}
    for i, spec in enumerate(placements):
        targets, rank, own_seed = lora_spec(spec)
        groups[spec] = add_lora(pipe.unet, rank, float(rank), targets, seed=seed if own_seed is None else own_seed,
                                adapter=f"placement_{i}")
    pipe.unet.set_adapters([f"placement_{i}" for i in range(len(placements))], weights=[1.0] * len(placements))
    return groups


def placement_rows(placements: list[str], cells: list[Path], model: str = "embedded", clicks: int = max(AT),
                   replicates: int = REPLICATES, pipe=None, every_winner: bool = False) -> list[list[str]]:
    """One row per placement and cell: fresh LoRAs at every placement, seeded as the cell's session
    seeded its own unless a spec names a seed, all replayed in one backward per click (N with
    ``every_winner``, which gives best-of-N cells their null of random winners too)."""
    import torch

    from ..core.loading import load_pipeline
    from ..core.lora import remove_lora
    from ..core.runtime import resolve_runtime
    torch.set_num_threads(1)
    if pipe is None:        # the weights' dtype the first cell's session ran in ("auto" resolved here as there)
        dtype = json.loads((cells[0] / "session" / "session.json").read_text())["settings"].get("dtype", "auto")
        pipe = load_pipeline(model, torch_dtype=resolve_runtime("cpu", dtype).dtype)
    rng = np.random.default_rng(0)
    rows = []
    for cell in cells:
        seed = int(json.loads((cell / "session" / "session.json").read_text())["settings"].get("seed", 0))
        groups = stacked_loras(pipe, placements, seed)
        try:
            all_units, reports, best = replay_units(pipe, groups, cell, clicks, every_winner)
        finally:
            for i in range(len(placements)):
                remove_lora(pipe.unet, f"placement_{i}")
        recorded = [z_score(r["evidence_power"], r["evidence_null_sd"]) if r.get("evidence_null_sd") else np.nan
                    for r in reports]
        _variant, chooser, n, s = cell.name.split("__")
        for placement in placements:
            units = all_units[placement]
            alternatives = None
            if every_winner:
                alternatives, units = units, units[np.arange(len(units)), best]
            path = agreement_path(units)
            z95 = float("nan")
            if len(units) >= FROM_CLICK + 1:     # the null needs two looks at least
                if alternatives is not None:
                    z95 = random_winner_z95(alternatives, replicates, rng)
                elif n == "n2":                  # a pair's other winner flips its gradient's sign
                    maxima = [np.nanmax(agreement_path(units * rng.choice([-1.0, 1.0], size=(len(units), 1)))[FROM_CLICK - 1:])
                              for _ in range(replicates)]
                    z95 = float(np.quantile(maxima, 0.95))
            shown = [f"{path[c - 1]:+.1f}" if c <= len(path) and np.isfinite(path[c - 1]) else "—" for c in AT]
            at25 = f"{recorded[24]:+.1f}" if len(recorded) >= 25 and np.isfinite(recorded[24]) else "—"
            rows.append([placement, chooser, n[1:], s[1:], *shown, at25, str(first_at(path, LEVEL, FROM_CLICK) or "—"),
                         f"{z95:.1f}" if np.isfinite(z95) else "—",
                         str((np.isfinite(z95) and first_at(path, z95, FROM_CLICK)) or "—")])
    return rows


def _job(args):
    return placement_rows(*args)


def markdown(rows: list[list[str]], command: str) -> str:
    headers = (["placement", "chooser", "images", "seed"] + [f"z @{c}" for c in AT]
               + ["recorded z @25", "first z ≥ 2", "z95", "first ≥ z95"])
    return "\n".join([
        "## Where the LoRA keeps the clicks' agreement", "",
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`. Each saved click (pairs or best of N) replayed through the session's objective on a fresh "
        "LoRA at each placement (rank 4 and the cell's own LoRA seed unless the placement names them), at the base (bench/placement.py): **z** = the agreement of the unit click "
        "gradients (as bench/agreement.py); **recorded** = the z the cell's own rounds recorded (its placement, "
        "at its weights of the time); **z95** = the level only 5% of the same clicks with random winners reach "
        f"from click {FROM_CLICK} on ({REPLICATES} draws; for pairs a random sign, for best of N with "
        "`--every-winner` each click's gradient with a winner drawn from its N images). Every placement is its own adapter "
        "on one UNet, all active at B = 0, so one backward per click gives each placement's own gradient.", "", table(headers, rows), ""])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", nargs="+", required=True, help="folders of bench/learning.py cells")
    p.add_argument("--variants", nargs="+", required=True, help="the variants whose cells to replay")
    p.add_argument("--cells", nargs="*", default=[], help="only cells whose name ends so (e.g. greener__n2__s1)")
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS),
                   help=f"where the LoRAs sit, each NAME[:rRANK][:sSEED] (rank 4 and the LoRA seed 0 unless given); "
                        f"NAME one of {', '.join(PLACEMENTS)}")
    p.add_argument("--clicks", type=int, default=max(AT), help="the first clicks of each cell (default 50)")
    p.add_argument("--jobs", type=int, default=1, help="cells replayed at once, one process and thread each")
    p.add_argument("--every-winner", action="store_true",
                   help="replay each click with every one of its images the winner (N backward passes a click), "
                        "for best of N's null of random winners")
    p.add_argument("--docs", help="markdown file to write the section into (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="print only")
    a = p.parse_args(argv)
    for spec in a.placements:
        try:
            lora_spec(spec)
        except ValueError as e:
            p.error(str(e))
    cells = [c for workdir in a.workdir for c in sorted(Path(workdir).iterdir())
             if c.is_dir() and c.name.count("__") == 3 and c.name.split("__")[0] in a.variants
             and (not a.cells or any(c.name.endswith(e) for e in a.cells))]
    if not cells:
        raise SystemExit(f"no cell of {a.variants} in {a.workdir}")
    model = json.loads((cells[0] / "session" / "session.json").read_text())["model"]
    jobs = max(1, min(a.jobs, len(cells)))
    work = [(a.placements, cells[j::jobs], model, a.clicks, REPLICATES, None, a.every_winner) for j in range(jobs)]
    if jobs > 1:
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            results = pool.map(_job, work)
    else:
        results = [_job(w) for w in work]
    rows = [row for result in results for row in result]
    rows.sort(key=lambda row: (row[1], row[2], int(row[3]), a.placements.index(row[0])))
    command = (f"python -m d3po_studio.bench.placement --workdir {' '.join(a.workdir)} --variants {' '.join(a.variants)}"
               + (f" --cells {' '.join(a.cells)}" if a.cells else "") + f" --placements {' '.join(a.placements)}" + (" --every-winner" if a.every_winner else ""))
    text = markdown(rows, command)
    if not a.no_docs:
        write_section("placement", text, **({"path": a.docs} if a.docs else {}))
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
