"""How long a click takes on the embedded model: sample a pair, update, and click-to-next-pair
(update + sampling the next pair), with the update compared to its floor.

    nice -n 10 python -m d3po_studio.bench.latency            # embedded model if its weights exist
    python -m d3po_studio.bench.latency --model tiny --clicks 2 --doc /tmp/b.md   # smoke run

Without the embedded weights, "auto" measures the embedded architecture with random weights
(the same computation; the section says which).

The floor of an update is what it cannot avoid: per trained step one reference forward (LoRA
off, no graph) and one policy forward + backward, timed directly on the same UNet, batch and
settings. Everything else (loss, optimizer step, the checkpoint written for undo, the round's
log) is overhead. Writes the "latency" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from . import report

PROMPTS = ["a red circle", "a blue square on white background", "a large green triangle", "a small yellow circle"]
MODEL_NOTES = {"embedded-random": " (the embedded model's architecture and sampling settings with random "
                                  "weights, because its trained weights were not there yet: the same computation)",
               "tiny": " (the tiny test pipeline: a smoke run, not a figure to quote)"}


def open_session(model: str, folder):
    """A session on ``model``: "embedded"; "embedded-random" (the embedded model's architecture and
    sampling defaults with random weights: the same compute, for when its weights are missing);
    "tiny" (the tiny test pipeline, for smoke runs); or a model path."""
    from ..core.session import Session
    if model == "tiny":
        from ..core.tiny import tiny_pipeline
        return Session.open(folder, model="tiny-sd1", pipeline=tiny_pipeline("sd1"), steps=10, guidance=4.0)
    if model == "embedded-random":
        from ..core.embedded import DEFAULTS
        return Session.open(folder, model=model, pipeline=_embedded_architecture(folder), **DEFAULTS)
    return Session.open(folder, model=model)


def _embedded_architecture(folder):
    from pathlib import Path

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..core.embedded.train import SCHEDULER_CONFIG, build_tokenizer, make_models
    tokenizer = build_tokenizer(Path(folder) / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        vae, text_encoder, unet = make_models(tokenizer, seed=0)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER_CONFIG), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def embedded_available() -> bool:
    from ..core.embedded import WEIGHTS_DIR
    return (WEIGHTS_DIR / "model_index.json").exists()


def update_floor(session, batch) -> float:
    """Seconds of the unavoidable work of one update of ``batch``'s pair, timed directly."""
    from ..core.lora import lora_disabled
    from ..core.sampling import make_scheduler
    from ..core.update import step_logprobs, steps_to_train
    s, traj, unet = session.settings, batch.trajectory, session.pipe.unet
    scheduler = make_scheduler(session.pipe, len(traj.timesteps))
    kw = dict(guidance=s.guidance if s.guidance_in_update else 1.0, eta=s.eta, reduction=s.reduction,
              device=session.runtime.device)
    start = time.perf_counter()
    for k in steps_to_train(traj, scheduler, s.eta, 1.0, None):
        with torch.no_grad(), lora_disabled(unet):
            step_logprobs(unet, scheduler, traj, k, [0, 1], **kw)
        step_logprobs(unet, scheduler, traj, k, [0, 1], **kw).sum().backward()
    seconds = time.perf_counter() - start
    session.optimizer.zero_grad(set_to_none=True)
    return seconds


def measure(session, clicks: int = 7, warmup: int = 1) -> dict:
    """Median seconds over ``clicks`` clicks (after ``warmup`` unrecorded ones)."""
    rows = []
    batch = session.sample(PROMPTS[0], n=2, seed=0)
    for i in range(warmup + clicks):
        floor = update_floor(session, batch)
        t0 = time.perf_counter()
        rep = session.prefer(batch, best=i % 2)
        t1 = time.perf_counter()
        batch = session.sample(PROMPTS[(i + 1) % len(PROMPTS)], n=2, seed=i + 1)
        t2 = time.perf_counter()
        if i >= warmup:
            rows.append({"update": rep["seconds"], "prefer": t1 - t0, "sample": t2 - t1,
                         "click_to_next": t2 - t0, "floor": floor})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"median": med, "rows": rows, "clicks": clicks, "settings": session.settings.to_dict(),
            "runtime": session.runtime.describe(), "model": session.meta["model"],
            "trainable_parameters": sum(p.numel() for p in session.params), "threads": torch.get_num_threads()}


def markdown(result: dict, command: str) -> str:
    m, s, rt = result["median"], result["settings"], result["runtime"]
    target = "met" if m["click_to_next"] <= 1.0 else "not met"
    rows = [["sample a pair (incl. decode, save)", f"{m['sample']:.3f}"],
            ["update (`report['seconds']`)", f"{m['update']:.3f}"],
            ["prefer, wall (update + checkpoint + log)", f"{m['prefer']:.3f}"],
            ["**click → next pair** (prefer + sample)", f"**{m['click_to_next']:.3f}**"],
            ["floor of the update (ref fwd + policy fwd/bwd per step)", f"{m['floor']:.3f}"],
            ["update ÷ floor", f"{m['update'] / m['floor']:.2f}×"]]
    return "\n".join([
        "## Latency of a click\n",
        f"Machine: {report.machine()}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.\n",
        f"Model: `{result['model']}`{MODEL_NOTES.get(result['model'], '')}; {s['steps']} DDIM steps, CFG {s['guidance']} (also in the update), "
        f"{s['width']}×{s['height']} px, pair of 2 images, all {s['steps']} steps trained; runtime "
        f"{rt['dtype']} weights, {rt['optimizer']}, {rt['attention']}, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; LoRA rank {s['lora_rank']} "
        f"({result['trainable_parameters']:,} parameters), {result.get('threads', '?')} torch threads. Medians over {result['clicks']} clicks after a warm-up "
        "click, on shared CPU cores (other jobs running).\n",
        report.table(["step", "median s"], rows),
        f"\nTarget click → next pair ≤ 1.0 s: **{target}** ({m['click_to_next']:.2f} s).",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="auto", help="auto (embedded if its weights exist, else embedded-random), "
                   "embedded, embedded-random, tiny, or a model path")
    p.add_argument("--clicks", type=int, default=7)
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    a = p.parse_args(argv)
    model = a.model if a.model != "auto" else ("embedded" if embedded_available() else "embedded-random")
    with tempfile.TemporaryDirectory(prefix="d3po-latency-") as folder:
        session = open_session(model, folder)
        try:
            result = measure(session, a.clicks)
        finally:
            session.close()
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = threads + "python -m d3po_studio.bench.latency " + " ".join(argv if argv is not None else sys.argv[1:])
    report.write_section("latency", markdown(result, command.strip()), a.doc)
    print(report.read_section("latency", a.doc))


if __name__ == "__main__":
    main()
