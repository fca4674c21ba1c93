"""Can the session's LoRA learn a chooser at all? Upper bounds beside bench/learning.py.

    python -m d3po_studio.bench.expressible --workdir runs/ex                 # RAFT, every chooser, 3 seeds
    python -m d3po_studio.bench.expressible --workdir runs/ex --source world --k 16 --lr 0.003
                                                  # the LoRA fitted to the renderer's images the chooser likes

bench/learning.py asks whether *clicks* steer the model. When a chooser is not learned there, two
explanations call for different next steps: the LoRA (its rank and layers, on this model, in 50
rounds) cannot draw what the chooser prefers, or it can and D3PO does not find it from the
clicks. This benchmark removes D3PO and the clicks' scarcity of information: the chooser's score
itself ranks the images and the LoRA is fitted to the best by plain supervised denoising. Each
round takes ``--k`` images of one prompt of the embedded world, keeps the one the chooser scores
highest and takes ``--sft-steps`` AdamW steps of the ε-MSE on it at random timesteps (the
conditional prediction, as the model was trained). The images come from

    --source model   the session's own sampler (one shared x_T, as a best-of-k click): RAFT,
                     Dong et al. 2023, "reward-ranked fine-tuning", arXiv 2304.06767;
    --source world   the embedded world's renderer (core/embedded/world.py), i.e. correct images
                     of the prompt: what the LoRA learns when shown exactly what the chooser likes.

Same session, LoRA (rank, targets), prompts, held-out pairs, scores and fidelity checker as
bench/learning.py, so the tables line up; the random chooser is the control. A chooser this moves
(effect beyond the control's, fidelity kept) is learnable by the LoRA in that many rounds; one it
does not move even from the renderer's images is evidence that the LoRA cannot draw it in that
budget, whatever the clicks. Every cell in ``--workdir`` is tabulated into the "expressible"
section of docs/benchmarks.md.
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
import torch.nn.functional as F

from ..core.diffusion_dpo import noised
from ..core.lora import activate
from ..core.oracles import get_oracle
from ..core.sampling import make_scheduler, predict_noise
from ..core.simulate import EVAL_SEED_OFFSET, eval_set, evaluate
from ..core.storage import write_json
from .learning import (BENCH_SETTINGS, CHOOSERS, CONTROL, add_output_arguments, format_value, parse_value,
                       run_cells, tables)
from .report import write_section

EVAL_AT = (10, 25, 50, 100)


def denoising_loss(unet, x0: torch.Tensor, cond: dict, t: int, noise: torch.Tensor, scheduler) -> torch.Tensor:
    """ε-MSE (or v-MSE) of the conditional prediction at timestep ``t`` for clean latents ``x0``."""
    x_t, target = noised(x0, noise, float(scheduler.alphas_cumprod[t]), scheduler.config.prediction_type)
    x_t, target = x_t.to(unet.device), target.to(unet.device)
    return F.mse_loss(predict_noise(unet, x_t, t, cond, 1.0), target.float())


def world_batch(pipe, prompt: str, seed: int, k: int, device) -> tuple[list, torch.Tensor, dict]:
    """k images of ``prompt`` drawn by the embedded world's renderer (the model's training data), their
    VAE latents and the prompt's conditioning — a batch the model did not sample."""
    from ..core.embedded.world import render_prompt
    from ..core.sampling import encode_conditioning
    rng = random.Random(seed)
    images = [render_prompt(prompt, rng) for _ in range(k)]
    pixels = pipe.image_processor.preprocess(images).to(device, pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        cond = encode_conditioning(pipe, prompt, "", images[0].height, images[0].width, device)
    return images, latents.float().cpu(), cond


def raft_round(session, chooser, prompt: str, seed: int, k: int, optimizer, sft_steps: int,
               generator: torch.Generator, source: str = "model") -> dict:
    """k images of ``prompt`` (sampled by the session's model, or drawn by the world's renderer with
    ``source="world"``), the chooser's best kept, the LoRA fitted to it. Returns the round's record."""
    pipe = session.pipe
    device = session.runtime.device
    if source == "model":
        batch = session.sample(prompt, n=k, seed=seed)
        images, latents, cond = batch.images, batch.trajectory.latents[-1].float(), batch.trajectory.cond
    elif source == "world":
        images, latents, cond = world_batch(pipe, prompt, seed, k, device)
    else:
        raise ValueError(f"source={source!r}: use 'model' or 'world'")
    best = int(np.argmax(chooser(images, prompt)))
    activate(pipe.unet, session.adapter, session.params)
    scheduler = make_scheduler(pipe, session.settings.steps)
    x0 = latents[best:best + 1]
    cond = {key: v.to(device) for key, v in cond.items()}
    losses = []
    for _ in range(sft_steps):
        t = int(torch.randint(0, scheduler.config.num_train_timesteps, (1,), generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss = denoising_loss(pipe.unet, x0, cond, t, noise, scheduler)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"best": best, "loss": float(np.mean(losses))}


def run_cell(cell: dict) -> dict:
    """One (chooser, seed) cell: a fresh session, ``rounds`` RAFT rounds, evaluations on the way."""
    from ..core.embedded.checker import fidelity
    from ..core.embedded.world import random_prompt
    from ..core.session import Session
    out = Path(cell["out"])
    chooser = get_oracle(cell["chooser"])
    seed, rounds = cell["seed"], cell["rounds"]
    started = time.perf_counter()
    settings = {**BENCH_SETTINGS, **cell.get("settings", {})}
    with Session.open(out / "session", model="embedded", seed=seed, **settings) as session:
        optimizer = torch.optim.AdamW(session.params, lr=cell["lr"], weight_decay=0.0)
        generator = torch.Generator().manual_seed(seed)
        pairs = eval_set(cell["eval_pairs"], seed)
        base = [session.render(p, s, scale=0.0)[0] for p, s in pairs]
        base_fid = fidelity(base, [p for p, _ in pairs])
        train_rng = random.Random(f"train-{seed}")     # the prompts and seeds bench/learning.py draws
        rows, seconds = [], []
        for r in range(1, rounds + 1):
            tick = time.perf_counter()
            prompt = random_prompt(train_rng)
            raft_round(session, chooser, prompt, train_rng.randrange(EVAL_SEED_OFFSET), cell["k"], optimizer,
                       cell["sft_steps"], generator, cell.get("source", "model"))
            seconds.append(time.perf_counter() - tick)
            if r in EVAL_AT or r == rounds:
                rows.append(evaluate(session, pairs, base, r, base_fid)[0])
            if r % 5 == 0:
                print(f"round {r}/{rounds} at {time.perf_counter() - started:.0f} s", flush=True)
        report = {"oracle": cell["chooser"], "n": cell["k"], "seed": seed, "rounds": rounds,
                  "variant": cell["variant"], "lr": cell["lr"], "sft_steps": cell["sft_steps"],
                  "source": cell.get("source", "model"),
                  "runtime": session.runtime.describe(), "base_fidelity": base_fid, "checkpoints": rows,
                  "seconds_per_click": float(np.median(seconds))}
    write_json(out / "report.json", report)
    return report


def markdown(reports: list[dict], command: str, rounds: int, eval_pairs: int) -> str:
    lines = [
        "## Which choosers the LoRA can learn at all: fitted to the chooser's best images",
        "",
        f"Command: `{command}` ({time.strftime('%Y-%m-%d')}; one torch thread per cell). Each cell: a fresh "
        "session on the embedded model (the defaults' LoRA, rank 4 on the attention projections, unless the "
        "variant names other lora_ settings), then per round "
        "k images of a prompt from the embedded world — sampled by the model (**raft**) or drawn by the world's "
        "renderer (**world**) — the chooser's best of them kept, and supervised "
        "denoising steps on it (AdamW, no preference loss, no trust region); evaluated like bench/learning.py "
        f"on {eval_pairs} held-out pairs (win, effect, fidelity as there; the \"clicks\" columns count rounds). "
        "Variant names give k, the steps per round and the learning rate. Mean ± sd over seeds.",
        "",
        *tables(reports, rounds, EVAL_AT, "Control: the random chooser (the LoRA fitted to a random one of the "
                "k images), scored by each chooser (win / effect):", unit="round"),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--k", type=int, default=4, help="images sampled per round (the chooser keeps the best)")
    p.add_argument("--sft-steps", type=int, default=4, help="denoising steps on each round's best image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--source", choices=("model", "world"), default="model",
                   help="where each round's k images come from: the model's samples (RAFT) or the world's renderer")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="session settings for these cells, e.g. lora_rank=16 (they join the variant's name)")
    p.add_argument("--choosers", nargs="+", default=[*CHOOSERS, CONTROL])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-pairs", type=int, default=48)
    p.add_argument("--jobs", type=int, default=2, help="cells at once (one torch thread each)")
    add_output_arguments(p, "keep the cells here; existing reports are reused, and every cell here is "
                            "tabulated (default: a temp folder)")
    args = p.parse_args(argv)
    if args.cell:
        run_cell(json.loads(args.cell))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="d3po-expressible-"))
    settings = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    variant = (f"{'raft' if args.source == 'model' else 'world'}-k{args.k}-s{args.sft_steps}-lr{args.lr:g}"
               + "".join(f"-{k}={format_value(v)}" for k, v in settings.items()))
    cells = [{"variant": variant, "chooser": c, "seed": s, "k": args.k, "sft_steps": args.sft_steps, "lr": args.lr,
              "source": args.source, "settings": settings,
              "rounds": args.rounds, "eval_pairs": args.eval_pairs,
              "out": str(workdir / f"{variant}__{c}__s{s}")} for s in args.seeds for c in args.choosers]
    if not args.no_run:
        run_cells(cells, args.jobs, module="d3po_studio.bench.expressible")
    # every cell in the folder, so runs of other settings into the same --workdir make one table
    reports = [json.loads(path.read_text()) for path in sorted(workdir.glob("*/report.json"))]
    command = "python -m d3po_studio.bench.expressible " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(reports, command.strip(), args.rounds, args.eval_pairs)
    if not args.no_docs:
        write_section("expressible", text, **({"path": args.docs} if args.docs else {}))
    print(text)


if __name__ == "__main__":
    main()
