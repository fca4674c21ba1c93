"""Can the session's LoRA express a chooser at all? A ceiling that needs no clicks.

    python -m d3po_studio.bench.ceiling                        # every chooser + random, 3 seeds (~1 h on 2 cores)
    python -m d3po_studio.bench.ceiling --choosers larger-shape random --seeds 0 --workdir runs/ceiling

The learning benchmark (bench/learning.py) asks whether 50 clicks steer the embedded model. When a
chooser is not learned, that alone does not say whether the clicks carry too little information
or whether the LoRA cannot draw what the chooser wants without breaking the prompt. This
benchmark measures the second: rejection-sampling fine-tuning (RAFT, Dong et al. 2023), given far
more than clicks give. A cell (chooser, seed) opens a fresh session on the embedded model with the
default settings (same LoRA: rank, targets), samples ``--best-of`` images with independent noise
for each of ``--prompts`` training prompts with the base model, keeps the image the chooser scores
highest, and fits the LoRA to those winners with the ordinary denoising loss (conditional
prediction, uniform timesteps, AdamW). It is evaluated like the learning benchmark (the same
held-out pairs, metrics and fidelity checker) after each of ``--eval-at`` optimizer steps.

The random chooser is the control: the same fit on randomly picked images measures how far
fitting the model's own samples moves the scores and the fidelity without any preference.
A chooser whose effect stays under +0.5 at fidelity ≥ 90% here, with 8× the images of 50 clicks
of four and a clean, noise-free choice on every one, is out of reach of this LoRA on this model
for any click rule; one that gets there is expressible, and a click rule that does not learn it
lacks information, not capacity. Writes the "ceiling" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..core.embedded.checker import fidelity
from ..core.embedded.world import random_prompt
from ..core.lora import lora_scaled
from ..core.oracles import ORACLES, get_oracle
from ..core.sampling import decode, make_scheduler, sample_trajectory
from ..core.simulate import _ratio, eval_set, evaluate, score_each
from ..core.storage import write_json
from .learning import BENCH_SETTINGS, CHOOSERS, CONTROL, _stat, run_cells
from .report import write_section

SEED_OFFSET = 2_000_000      # sample seeds of this benchmark: apart from clicks' and held-out ones


def winners(session, chooser: str, prompts: list[str], best_of: int, seed: int) -> tuple[list[dict], dict]:
    """Per prompt, the base model's best of ``best_of`` independent samples by ``chooser``:
    its final latent and conditional prompt embedding. Also how far selection moved the score
    (winners' mean minus all samples' mean, in units of the samples' sd)."""
    pipe, s, oracle = session.pipe, session.settings, get_oracle(chooser)
    chosen, all_scores, best_scores = [], [], []
    with torch.no_grad(), lora_scaled(pipe.unet, 0.0, session.adapter):
        for i, prompt in enumerate(prompts):
            traj = sample_trajectory(pipe, prompt, "", best_of, SEED_OFFSET + seed * 100_000 + i,
                                     steps=s.steps, guidance=s.guidance, eta=s.eta, height=s.height,
                                     width=s.width, device=session.runtime.device, shared_start=False)
            latents = traj.latents[-1].float()
            scores = oracle(decode(pipe, latents), prompt)
            best = int(np.argmax(scores))
            chosen.append({"x0": latents[best], "emb": traj.cond["prompt_embeds"][0].float()})
            all_scores += scores
            best_scores.append(scores[best])
    sd = float(np.std(all_scores)) or 1.0
    return chosen, {"selection_differential": (float(np.mean(best_scores)) - float(np.mean(all_scores))) / sd}


def fit_step(unet, scheduler, batch: list[dict], optimizer, generator: torch.Generator, device) -> float:
    """One AdamW step of the denoising loss on ``batch`` (one uniform timestep per example)."""
    x0 = torch.stack([b["x0"] for b in batch]).to(device)
    emb = torch.stack([b["emb"] for b in batch]).to(device, unet.dtype)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(batch),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    a = scheduler.alphas_cumprod[t].to(device).view(-1, 1, 1, 1).float()
    kind = scheduler.config.prediction_type
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {kind!r}: the ceiling fits epsilon and v_prediction models")
    target = noise if kind == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    pred = unet(x_t.to(unet.dtype), t.to(device), encoder_hidden_states=emb, return_dict=False)[0].float()
    loss = torch.nn.functional.mse_loss(pred, target)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def run_cell(cell: dict) -> dict:
    from ..core.session import Session
    out = Path(cell["out"])
    started = time.perf_counter()
    session = Session.open(out / "session", model="embedded", seed=cell["seed"], **BENCH_SETTINGS)
    with session:
        pipe, device = session.pipe, session.runtime.device
        pairs = eval_set(cell["eval_pairs"], cell["seed"])
        prompts = [p for p, _ in pairs]
        base = [session.render(p, s, scale=0.0)[0] for p, s in pairs]
        base_fid = fidelity(base, prompts)
        rng = random.Random(f"ceiling-{cell['seed']}")
        train_prompts = [random_prompt(rng) for _ in range(cell["prompts"])]
        data, selection = winners(session, cell["chooser"], train_prompts, cell["best_of"], cell["seed"])
        sampled = time.perf_counter() - started
        print(f"sampled {cell['prompts']} x {cell['best_of']} in {sampled:.0f} s", flush=True)
        optimizer = torch.optim.AdamW(session.params, lr=cell["lr"], weight_decay=0.0)
        scheduler = make_scheduler(pipe, session.settings.steps)
        generator = torch.Generator("cpu").manual_seed(cell["seed"])
        order = random.Random(cell["seed"])
        rows, losses = [], []
        for step in range(1, max(cell["eval_at"]) + 1):
            losses.append(fit_step(pipe.unet, scheduler, order.sample(data, min(cell["batch"], len(data))),
                                   optimizer, generator, device))
            if step in cell["eval_at"]:
                row, _ = evaluate(session, pairs, base, step)
                row["fidelity_vs_base"] = _ratio(row["fidelity"], base_fid)
                row["loss"] = float(np.mean(losses[-50:]))
                rows.append(row)
                own = row["oracles"][cell["chooser"]]
                print(f"step {step}: effect {own['effect_size']:+.2f} win {own['win_rate']:.2f} "
                      f"fidelity {row['fidelity_vs_base']:.2f} at {time.perf_counter() - started:.0f} s", flush=True)
        report = {**cell, "lora": {"rank": session.settings.lora_rank, "targets": list(session.settings.lora_targets)},
                  "base_fidelity": base_fid, "checkpoints": rows, **selection,
                  "seconds": time.perf_counter() - started, "sampling_seconds": sampled,
                  "runtime": session.runtime.describe()}
    write_json(out / "report.json", report)
    return report


def _best_within(group: list[dict], chooser: str, floor: float) -> list[float]:
    """Per seed, the largest effect among the evaluations whose fidelity is at least ``floor``."""
    best = []
    for r in group:
        ok = [c["oracles"][chooser]["effect_size"] for c in r["checkpoints"] if (c["fidelity_vs_base"] or 0) >= floor]
        best.append(max(ok) if ok else float("nan"))
    return best


def markdown(reports: list[dict], command: str) -> str:
    eval_at = sorted({c["clicks"] for r in reports for c in r["checkpoints"]})
    first = reports[0]
    lines = [
        "## Ceiling: can the LoRA express a chooser? (rejection-sampling fine-tuning)",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; 2 shared CPU cores, one torch thread per cell). "
        f"Each cell: a fresh session on the embedded model with the default LoRA (rank {first['lora']['rank']} "
        f"on {', '.join(first['lora']['targets'])}); "
        f"{first['prompts']} training prompts, the base model's best of {first['best_of']} independent samples each "
        f"by the chooser ({first['prompts'] * first['best_of']} scored images; 50 clicks of four score 200), "
        f"the LoRA fitted to those winners by the denoising loss (AdamW lr {first['lr']}, batch {first['batch']}), "
        f"evaluated on the learning benchmark's {first['eval_pairs']} held-out pairs after "
        + ", ".join(str(s) for s in eval_at) + " steps. **selection** = winners' mean score − all samples' mean, "
        "in sd of the samples (how much the data asks for). **best at fid ≥ 90%** = per seed, the largest effect "
        "among the evaluations that kept fidelity ≥ 90% of base. Mean ± sd over seeds.",
        "",
        "| chooser | seeds | selection | " + " | ".join(f"effect / fidelity @{s}" for s in eval_at)
        + " | best at fid ≥ 90% | min/cell |",
        "|---|---|---|" + "---|" * len(eval_at) + "---|---|",
    ]
    for chooser in [c for c in (*CHOOSERS, CONTROL) if any(r["chooser"] == c for r in reports)]:
        group = [r for r in reports if r["chooser"] == chooser]
        score = chooser if chooser != CONTROL else None
        cells = []
        for s in eval_at:
            points = [c for r in group for c in r["checkpoints"] if c["clicks"] == s]
            if score:
                effect = _stat([p["oracles"][score]["effect_size"] for p in points], "+.2f")
            else:      # the control: the largest drift of any chooser's score
                effect = "max " + _stat([max((p["oracles"][n]["effect_size"] for n in CHOOSERS if n in p["oracles"]),
                                             key=abs) for p in points], "+.2f")
            cells.append(f"{effect} / {_stat([p['fidelity_vs_base'] * 100 for p in points], '.0f')}%")
        best = _stat(_best_within(group, score, 0.9), "+.2f") if score else "—"
        lines.append(f"| {chooser} | {len(group)} | {_stat([r['selection_differential'] for r in group], '+.2f')} | "
                     + " | ".join(cells) + f" | {best} | {_stat([r['seconds'] / 60 for r in group], '.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument("--choosers", nargs="+", default=[*CHOOSERS, CONTROL])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--prompts", type=int, default=200, help="training prompts per cell")
    p.add_argument("--best-of", type=int, default=8, help="independent base samples per prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eval-at", type=int, nargs="+", default=[100, 300, 600], help="optimizer steps")
    p.add_argument("--eval-pairs", type=int, default=48)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--workdir", help="keep the cells here; existing reports are reused (default: a temp folder)")
    p.add_argument("--docs", default=None, help="benchmarks.md to write (default docs/benchmarks.md)")
    p.add_argument("--no-docs", action="store_true", help="print the table only")
    args = p.parse_args(argv)
    if args.cell:
        run_cell(json.loads(args.cell))
        return
    unknown = [c for c in args.choosers if c not in ORACLES]
    if unknown:
        p.error(f"unknown chooser(s) {unknown}; valid: {', '.join(sorted(ORACLES))}")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="d3po-ceiling-"))
    cells = [{"chooser": c, "seed": s, "prompts": args.prompts, "best_of": args.best_of, "lr": args.lr,
              "batch": args.batch, "eval_at": sorted(args.eval_at), "eval_pairs": args.eval_pairs,
              "out": str(workdir / f"{c}__s{s}")} for s in args.seeds for c in args.choosers]
    run_cells(cells, args.jobs, module="d3po_studio.bench.ceiling")
    reports = [json.loads((Path(c["out"]) / "report.json").read_text()) for c in cells
               if (Path(c["out"]) / "report.json").exists()]
    if not reports:
        sys.exit("no cell finished: see the cells' .log files in " + str(workdir))
    text = markdown(reports, ("python -m d3po_studio.bench.ceiling " + " ".join(argv or sys.argv[1:])).strip())
    if not args.no_docs:
        write_section("ceiling", text, **({"path": args.docs} if args.docs else {}))
    print(text)


if __name__ == "__main__":
    main()
