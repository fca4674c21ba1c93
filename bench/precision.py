"""How far a LoRA move changes the model's predictions in each weight dtype: the rounding floor
that the trust region's probes measure (docs/algorithm.md, "The trust region").

    OMP_NUM_THREADS=1 python -m d3po_studio.bench.precision          # embedded model, CPU: ~4 min
    python -m d3po_studio.bench.precision --device cuda --dtypes float32 float16

One trajectory is sampled in float32; then, per dtype, a LoRA with random weights is moved by
s·d along one fixed random direction d, and the guided prediction (and the conditional one
alone) at the trust region's probe steps is compared with the one at s = 0. In float32 the
change grows in proportion to s; in fp16 and bf16 any move, however small, changes the
predictions by a floor of rounding, which guidance multiplies. With ``--clicks K`` it also runs
K clicks of a session per dtype (Adam's step, trust region ρ = ``--rho``, no anchor) and
measures each click's true change, the same LoRA weights on the float32 model, against ρ: how
close the trust region lands where rounding hides the step. Writes the "precision" section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import sys

import torch

from . import report

SCALES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
WEIGHT_STD = 0.05     # the random LoRA's weights and the direction's entries
PROMPT = "a blue triangle"


def lora_direction(params, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Random LoRA weights to start from, and one random direction to move them along."""
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=g) * WEIGHT_STD for p in params]
    direction = [torch.randn(p.shape, generator=g) * WEIGHT_STD for p in params]
    return start, direction


@torch.no_grad()
def measure(pipe, trajectory, guidance: float, scales=SCALES, seed: int = 1, device="cpu",
            targets=None) -> list[dict]:
    """Per scale s: the RMS change of the guided and of the conditional prediction at the probe
    steps when the LoRA (on ``targets``, default the Settings' default) moves from its start by
    s·direction."""
    from ..core.config import Settings
    from ..core.lora import add_lora
    from ..core.trust_region import move_weights, predictions, probe_steps, rms_change

    s = Settings()
    params = add_lora(pipe.unet, s.lora_rank, s.lora_alpha, targets or s.lora_targets)
    start, direction = lora_direction(params, seed)
    steps, images = probe_steps(len(trajectory.timesteps)), list(range(trajectory.latents.shape[1]))

    def at(scale):
        move_weights(params, start, direction, scale)
        return (predictions(pipe, trajectory, steps, images, guidance, device),
                predictions(pipe, trajectory, steps, images, 1.0, device))

    guided0, cond0 = at(0.0)
    rows = []
    for scale in scales:
        guided, cond = at(scale)
        rows.append({"scale": scale, "guided": rms_change(guided0, guided), "cond": rms_change(cond0, cond)})
    return rows


def landing(pipe, ref, dtype: str, rho: float, clicks: int, device="cpu", targets=None, *, model: str = "bench",
            prompt: str = PROMPT, best=lambda click: click % 2, **settings) -> list[tuple[float, dict]]:
    """Per click of a session on ``pipe`` (weights in ``dtype``): the true RMS change of the guided
    predictions at the trust region's probes (the session's LoRA before and after the click, moved
    into ``ref``, a float32 copy of the model with its own LoRA), divided by ρ, and the click's
    report. Click c samples ``prompt`` with seed c and prefers image ``best(c)``; ``settings``
    override the session's."""
    import tempfile

    from ..core.config import Settings
    from ..core.lora import add_lora
    from ..core.session import Session
    from ..core.trust_region import move_weights, plan_predictions, probe_plan, probe_steps, rms_change

    d = Settings()
    targets = tuple(targets or d.lora_targets)
    ref_lora = add_lora(ref.unet, d.lora_rank, d.lora_alpha, targets)
    ratios = []
    with tempfile.TemporaryDirectory() as folder, \
            Session.open(folder, model=model, pipeline=pipe, dtype=dtype, device=device, optimizer="adamw",
                         step_rms=rho, step_evidence=False, drift_budget=None, lora_targets=targets, **settings) as s:
        plan = probe_plan(probe_steps(s.settings.steps, s.settings.step_probes), [0, 1], s.settings.probe_images)

        @torch.no_grad()
        def true_predictions(weights, trajectory):
            move_weights(ref_lora, weights, weights, 0.0)
            return plan_predictions(ref, trajectory, plan, s.settings.guidance, device)

        for click in range(clicks):
            batch = s.sample(prompt, n=2, seed=click)
            before = [p.detach().float().clone() for p in s.params]
            report = s.prefer(batch, best=best(click))
            after = [p.detach().float().clone() for p in s.params]
            ratios.append((rms_change(true_predictions(before, batch.trajectory),
                                      true_predictions(after, batch.trajectory)) / rho, report))
    return ratios


def markdown(results: dict[str, list[dict]], model: str, device: str, guidance: float, command: str,
             landed: dict[str, list[float]] | None = None, rho: float | None = None, targets=None) -> str:
    from ..core.config import Settings
    defaults = Settings()
    scales = next(iter(results.values()))
    headers = ["weights", "prediction"] + [f"s = {r['scale']:g}" for r in scales]
    rows = []
    for dtype, measured in results.items():
        for key, label in (("guided", f"guided ({guidance:g})"), ("cond", "conditional")):
            rows.append([dtype, label] + [f"{r[key]:.2g}" for r in measured])
    return "\n".join([
        "## Rounding floor of the predictions, per weight dtype",
        "",
        f"Command: `{command.strip()}` ({datetime.date.today()}, torch {torch.__version__}). "
        f"Model: `{model}` on {device}; one trajectory of \"{PROMPT}\" (2 images, "
        f"10 steps) sampled in float32; a LoRA of rank {defaults.lora_rank} on "
        f"{', '.join(targets or defaults.lora_targets)} with random weights "
        f"(sd {WEIGHT_STD}) moved by s times one random direction (sd {WEIGHT_STD}); RMS change of the "
        "prediction at the trust region's 3 probe steps against s = 0. In float32 the change grows with "
        "s; a change that stays the same as s shrinks is rounding, which the trust region's correction "
        "cannot tell from the step (docs/algorithm.md, \"The trust region\").",
        "",
        report.table(headers, rows),
    ] + ([] if not landed else [
        "",
        f"The trust region's landing: {len(next(iter(landed.values())))} clicks of a session per dtype "
        f"(\"{PROMPT}\", Adam's step, `step_rms={rho:g}`, no anchor), each click's true change (its LoRA "
        "before and after, on the float32 model) divided by ρ:",
        "",
        report.table(["weights", "true change ÷ ρ, per click", "median"],
                     [[name, ", ".join(f"{r:.2f}" for r in ratios), f"{sorted(ratios)[len(ratios) // 2]:.2f}"]
                      for name, ratios in landed.items()]),
    ]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="embedded, tiny (smoke run) or a model path")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--clicks", type=int, default=0, help="also measure the trust region's landing over this many clicks")
    p.add_argument("--rho", type=float, default=0.003, help="the trust region's step_rms for --clicks")
    p.add_argument("--lora-targets", help="comma-separated UNet modules for the LoRA (default: Settings' default)")
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    p.add_argument("--no-docs", action="store_true")
    args = p.parse_args(argv)
    targets = tuple(args.lora_targets.split(",")) if args.lora_targets else None
    from ..core.loading import load_pipeline
    from ..core.sampling import sample_trajectory
    from ..core.tiny import tiny_pipeline

    def load(dtype):
        if args.model == "tiny":
            return tiny_pipeline("sd1").to(args.device, dtype)
        return load_pipeline(args.model, torch_dtype=dtype, device=args.device)

    ref = load(torch.float32)
    size = ref.vae_scale_factor * ref.unet.config.sample_size
    trajectory = sample_trajectory(ref, PROMPT, "", 2, 5, steps=10, guidance=args.guidance, eta=1.0,
                                   height=size, width=size, device=args.device)
    results = {}
    for name in args.dtypes:
        pipe = ref if name == "float32" else load(getattr(torch, name))     # ref is float32 already
        results[name] = measure(pipe, trajectory, args.guidance, device=args.device, targets=targets)
        print(name, ", ".join(f"s={r['scale']:g}: {r['guided']:.2g} / {r['cond']:.2g}" for r in results[name]),
              flush=True)
    landed = {}
    for name in args.dtypes if args.clicks else ():
        landed[name] = [ratio for ratio, _ in landing(load(getattr(torch, name)), load(torch.float32), name, args.rho,
                                                      args.clicks, device=args.device, targets=targets)]
        print(name, "landing", ", ".join(f"{r:.2f}" for r in landed[name]), flush=True)
    text = markdown(results, args.model, args.device, args.guidance,
                    "python -m d3po_studio.bench.precision " + " ".join(sys.argv[1:] if argv is None else argv),
                    landed, args.rho, targets)
    if not args.no_docs:
        report.write_section("precision", text, args.doc)
    print(text)


if __name__ == "__main__":
    main()
