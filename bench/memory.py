"""Peak memory and time of one D3PO update: the official recipe, ours, and ours with each
saving switched off in turn — each configuration in its own process.

    nice -n 10 python -m d3po_studio.bench.memory                 # full run (~30 min on 2 cores)
    python -m d3po_studio.bench.memory --plan tiny-sd1:16 --doc /tmp/b.md   # smoke run

A full-size UNet (SD 1.5 or SDXL config, random weights, built in its weight dtype) updates on
one pair of a synthetic 20-step trajectory with CFG (batch 2 per image), over ``--kept-steps``
kept steps; memory is per kept step (one step's graph at a time), so a whole 20-step update
peaks at the same memory and takes ~20× the seconds per step. Peak memory is
``core.runtime.peak_memory_bytes``: CUDA max allocated on a GPU, the process's peak RSS on a
CPU. Results go to ``bench/results/memory.json`` and the "memory" section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import report

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class Variant:
    reference: str        # "lora-off" (ours) or "copy" (a deep copy of the UNet)
    dtype: str            # "half" (fp16 on a GPU, bf16 on a CPU) or "float32"; LoRA always fp32
    checkpointing: bool   # gradient checkpointing of the UNet
    optimizer: str        # "adamw8bit" (bitsandbytes) or "adamw" (torch, 32-bit states)
    attention: str        # "sdpa" (torch scaled_dot_product_attention) or "classic" (softmax(QKᵀ) kept)
    update: str           # "joint", "split" (core.split) or "official" (bench.official replica)
    note: str             # what differs from ours, in words


OURS = Variant("lora-off", "half", True, "adamw8bit", "sdpa", "joint", "as shipped (Settings defaults)")
VARIANTS = {
    "official": Variant("copy", "half", False, "adamw", "classic", "official",
                        "official recipe: deepcopy reference, no checkpointing, 32-bit AdamW, "
                        "LoRAAttnProcessor (classic attention), both images' graphs alive"),
    "ours": OURS,
    "ours-no-checkpointing": dataclasses.replace(OURS, checkpointing=False, note="checkpointing off"),
    "ours-copy-reference": dataclasses.replace(OURS, reference="copy", note="deepcopy reference"),
    "ours-adamw32": dataclasses.replace(OURS, optimizer="adamw", note="torch AdamW (32-bit states)"),
    "ours-classic-attention": dataclasses.replace(OURS, attention="classic", note="classic attention (no SDPA)"),
    "ours-fp32": dataclasses.replace(OURS, dtype="float32", note="fp32 weights"),
    "ours-split": dataclasses.replace(OURS, update="split", note="+ split gradient (core.split)"),
}
# family:size -> variants. 256 px and fewer SDXL variants keep the run near 30 min on 2 shared
# cores (at 512 px the official SD 1.5 configuration was killed out of memory on this 24 GiB machine).
# Most important first: results are written after each configuration.
PLAN = {"sd1:256": ["ours", "official", "ours-split", "ours-no-checkpointing", "ours-copy-reference",
                    "ours-classic-attention", "ours-fp32", "ours-adamw32"],
        "sdxl:256": ["ours", "ours-split", "official"]}


# ------------------------------------------------------------------ one configuration (child)
def measure(family: str, size: int, name: str, kept_steps: int = 2) -> dict:
    """One update of one pair with variant ``name``; run in a fresh process for a clean peak."""
    from diffusers.models.attention_processor import AttnProcessor

    from ..core.lora import add_lora
    from ..core.runtime import make_optimizer, peak_memory_bytes
    from ..core.sampling import make_scheduler
    from ..core.split import accumulate_d3po_gradients_split
    from ..core.update import accumulate_d3po_gradients, apply_gradients, steps_to_train
    from .official import OFFICIAL, accumulate_with_reference_copy, official_accumulate
    from .synthetic import build_pipeline, synthetic_trajectory

    v = VARIANTS[name]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    half = torch.float16 if device.type == "cuda" else torch.bfloat16
    dtype = half if v.dtype == "half" else torch.float32
    t0 = time.perf_counter()
    pipe = build_pipeline(family, dtype)
    pipe.unet.to(device)
    ref = _reference_copy(pipe.unet) if v.reference == "copy" and v.update != "official" else None
    params = add_lora(pipe.unet, 4, 4.0, LORA_TARGETS)
    if v.update == "official":           # the official code copies the UNet after adding its LoRA
        ref = _reference_copy(pipe.unet)
    for unet in filter(None, (pipe.unet, ref)):
        if v.attention == "classic":
            unet.set_attn_processor(AttnProcessor())
    if v.checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(v.optimizer, params, lr=3e-5 if v.update == "official" else 3e-3,
                               weight_decay=1e-4)
    trajectory = synthetic_trajectory(pipe, size, steps=20, n=2)
    usable = steps_to_train(trajectory, make_scheduler(pipe, 20), 1.0, 1.0, None)
    steps = [usable[(j + 1) * len(usable) // (kept_steps + 1)] for j in range(kept_steps)]
    gc.collect()
    setup_bytes = peak_memory_bytes(device)
    build_seconds = time.perf_counter() - t0

    marks = [time.perf_counter()]
    progress = lambda i, n: marks.append(time.perf_counter())  # noqa: E731
    if v.update == "official":
        metrics = official_accumulate(pipe, ref, trajectory, (0, 1), steps=steps, device=device,
                                      progress=progress, **{k: OFFICIAL[k] for k in ("beta", "guidance", "eta", "ratio_clip")})
    else:
        kw = dict(steps=steps, beta=0.1, guidance=5.0, eta=1.0, reduction="sum", ratio_clip=None,
                  device=device, progress=progress)
        if ref is not None:
            metrics = accumulate_with_reference_copy(pipe, ref, trajectory, [(0, 1)], **kw)
        elif v.update == "split":
            metrics = accumulate_d3po_gradients_split(pipe, trajectory, [(0, 1)], **kw)
        else:
            metrics = accumulate_d3po_gradients(pipe, trajectory, [(0, 1)], **kw)
    t_opt = time.perf_counter()
    grad_norm = apply_gradients(params, optimizer, 1.0)
    optimizer_seconds = time.perf_counter() - t_opt
    step_seconds = [b - a for a, b in zip(marks, marks[1:])]
    # The run's peak includes its setup. On the CPU both are VmHWM, which Linux (>= 6.2) computes
    # from approximate per-CPU RSS counters: a later reading can come out a few hundred KB below an
    # earlier one (seen: 200 KB), which would make the activations negative.
    peak_bytes = max(peak_memory_bytes(device), setup_bytes)
    return {**dataclasses.asdict(v), "variant": name, "family": family, "size": size, "kept_steps": kept_steps,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "peak_bytes": peak_bytes, "setup_bytes": setup_bytes,
            "seconds_per_step": _steady(step_seconds), "step_seconds": step_seconds,
            "optimizer_seconds": optimizer_seconds, "build_seconds": build_seconds,
            "loss": metrics["loss"], "grad_norm": grad_norm, "threads": torch.get_num_threads(),
            "unet_parameters": sum(p.numel() for p in pipe.unet.parameters()) - sum(p.numel() for p in params),
            "lora_parameters": sum(p.numel() for p in params)}


def _steady(step_seconds: list[float]) -> float:
    """Mean seconds per kept step, leaving out the first when there are more (one-off kernel setup)."""
    kept = step_seconds[1:] or step_seconds
    return sum(kept) / len(kept)


def _reference_copy(unet):
    ref = copy.deepcopy(unet)
    ref.requires_grad_(False)
    return ref


# ------------------------------------------------------------------ orchestration (parent)
def run_plan(plan: dict[str, list[str]], kept_steps: int = 2, timeout: float = 900, log=print,
             on_result=None, command: str = "") -> list[dict]:
    """Run each (family:size, variant) in a fresh child process, one at a time;
    ``on_result(results so far)`` after each."""
    results = []
    for key, names in plan.items():
        family, size = key.split(":")
        for name in names:
            started = time.perf_counter()
            row = {**_run_child(family, int(size), name, kept_steps, timeout), "command": command}
            log(f"{key} {name}: " + (f"peak {report.gb(row['peak_bytes'])}, {row['seconds_per_step']:.1f} s/step"
                                     if "error" not in row else row["error"])
                + f" ({time.perf_counter() - started:.0f} s)")
            results.append(row)
            if on_result:
                on_result(results)
    return results


def _run_child(family: str, size: int, name: str, kept_steps: int, timeout: float) -> dict:
    cmd = [sys.executable, "-m", f"{__package__}.memory", "--child", f"{family}:{size}", name,
           "--kept-steps", str(kept_steps)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dict(os.environ))
    except subprocess.TimeoutExpired:
        return {"variant": name, "family": family, "size": size, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == -9:
        return {"variant": name, "family": family, "size": size,
                "error": "killed (SIGKILL, most likely out of memory)"}
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"variant": name, "family": family, "size": size,
                "error": f"exit {proc.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def markdown(results: list[dict], command: str) -> str:
    """The "memory" section: one table per family and size, ratios within the same run."""
    out = [f"## Memory of one update\n\nMachine: {report.machine()}. Date: {time.strftime('%Y-%m-%d')}. "
           f"Command: `{command}`.\n",
           "One D3PO update of one pair with CFG 5 (batch 2 per image, as in training), LoRA rank 4 on "
           "to_q/to_k/to_v/to_out.0 (fp32), random full-size UNet weights built from the published config, "
           "synthetic 20-step trajectory, each configuration in its own process. Memory is per kept step "
           "(one step's graph at a time), so the peak of a 20-step update is the same; the time of a "
           "whole update is about 20 × s/step + the optimizer step. \"half\" weights are bf16 on a CPU "
           "(fp16 on a GPU). Peak = process peak RSS on a CPU (CUDA max allocated on a GPU); \"model\" = "
           "the peak after building the UNet(s), LoRA, optimizer and trajectory, before the update; "
           "\"update\" = peak − model. CPU timings are on shared cores (other jobs running): compare "
           "within a table, not across runs.\n"]
    for key in dict.fromkeys(f"{r['family']}:{r['size']}" for r in results):
        rows = [r for r in results if f"{r['family']}:{r['size']}" == key]
        byname = {r["variant"]: r for r in rows if "error" not in r}
        official, ours = byname.get("official"), byname.get("ours")
        family, size = key.split(":")
        kept = next((r["kept_steps"] for r in byname.values()), "?")
        out.append(f"### {family} at {size}×{size} px ({kept} kept steps per update)\n")
        table = []
        for r in rows:
            if "error" in r:
                table.append([r["variant"], "—", "—", "—", "—", "—", "—", r["error"]])
                continue
            table.append([r["variant"], report.gb(r["peak_bytes"]), report.gb(r["setup_bytes"]),
                          report.gb(r["peak_bytes"] - r["setup_bytes"]),
                          _ratio(r, official), _ratio(r, ours), f"{r['seconds_per_step']:.1f}",
                          VARIANTS[r["variant"]].note])
        out.append(report.table(["config", "peak", "model", "update", "÷ official", "÷ ours", "s/step", "what"],
                                 table))
        if official and ours:
            ratio = ours["peak_bytes"] / official["peak_bytes"]
            out.append(f"\n**ours / official peak = {ratio:.2f}×** (target ≤ 0.40×: "
                       f"{'met' if ratio <= 0.4 else 'not met'}); update part alone "
                       f"{(ours['peak_bytes'] - ours['setup_bytes']) / max(1, official['peak_bytes'] - official['setup_bytes']):.2f}×; "
                       f"time per kept step {ours['seconds_per_step'] / official['seconds_per_step']:.2f}×.")
            shares = [f"{VARIANTS[n].note}: +{report.gb(byname[n]['peak_bytes'] - ours['peak_bytes'])}"
                      for n in byname if n.startswith("ours-") and n != "ours-split"]
            if shares:
                out.append("What each saving is worth (peak with it switched off − ours): " + "; ".join(shares) + ".")
        out.append("")
    return "\n".join(out)


def _ratio(r: dict, base: dict | None) -> str:
    return f"{r['peak_bytes'] / base['peak_bytes']:.2f}×" if base else "—"


def parse_plan(items: list[str], variants: list[str] | None, default_plan=PLAN, known=VARIANTS) -> dict[str, list[str]]:
    """{"family:size": variant names} from ``--plan`` items, each with ``variants`` or its default."""
    plan = {}
    for item in items:
        if ":" not in item:
            raise SystemExit(f"--plan {item!r}: write family:size, e.g. sd1:512")
        plan[item] = variants or default_plan.get(item, list(known))
    unknown = [n for names in plan.values() for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}: use {list(known)}")
    return plan


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", nargs="+", default=list(PLAN), help="family:size items, e.g. sd1:512 sdxl:256")
    p.add_argument("--variants", nargs="+", help=f"subset of {list(VARIANTS)} (default: the plan's)")
    p.add_argument("--kept-steps", type=int, default=2)
    p.add_argument("--doc", default=str(report.DEFAULT_PATH), help="markdown file to write the section into")
    p.add_argument("--results", default=str(RESULTS), help="JSON file for the raw results")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the sections from --results (no run)")
    p.add_argument("--child", nargs=2, metavar=("FAMILY:SIZE", "VARIANT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        family, size = a.child[0].split(":")
        print(json.dumps(measure(family, int(size), a.child[1], a.kept_steps)))
        return
    command = "python -m d3po_studio.bench.memory " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.rewrite:
        results = json.loads(Path(a.results).read_text())
        write_all(results, results[0].get("command", "python -m d3po_studio.bench.memory") if results else command,
                  a.doc, a.results)
        return
    plan = parse_plan(a.plan, a.variants)
    run_plan(plan, a.kept_steps, on_result=lambda results: write_all(results, command.strip(), a.doc, a.results),
             command=command.strip())


def write_all(results: list[dict], command: str, doc, results_path) -> None:
    """The raw JSON, the "memory" section and the "estimate" section, from the results so far."""
    from .estimate import write_estimate
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    Path(results_path).write_text(json.dumps(results, indent=1))
    report.write_section("memory", markdown(results, command), doc)
    report.write_section("split", split_markdown(results), doc)
    write_estimate(results, doc)


def split_markdown(results: list[dict]) -> str:
    """The "split" section: the split-gradient update against ours, from the same run."""
    out = ["## Split-gradient update (`core/split.py`)\n",
           "The D3PO gradient of a pair splits per image: with c = β·σ(−β(Δ_w − Δ_l)) from a forward "
           "without a graph, ∇L = −c·∇log π(w) + c·∇log π(l). So the winner and the loser are "
           "back-propagated one at a time: one image's graph instead of two, for one extra forward "
           "without a graph per kept step. `accumulate_d3po_gradients_split` has the signature and "
           "return value of `core.update.accumulate_d3po_gradients`; `tests/test_bench.py` checks that "
           "both give the same LoRA gradients (float64, tolerance 1e-9 of the gradient norm; measured "
           "≈ 1e-14; in float32 they agree to ≈ 1e-5 relative) for one pair with CFG and for a ranking "
           "of 3 with the official ratio clamp. Measured in the memory run above:\n"]
    rows = []
    for key in dict.fromkeys(f"{r['family']}:{r['size']}" for r in results):
        by = {r["variant"]: r for r in results if f"{r['family']}:{r['size']}" == key and "error" not in r}
        if "ours" in by and "ours-split" in by:
            a, b = by["ours"], by["ours-split"]
            rows.append([key.replace(":", " at ") + " px", report.gb(a["peak_bytes"] - a["setup_bytes"]),
                         report.gb(b["peak_bytes"] - b["setup_bytes"]), f"{b['peak_bytes'] / a['peak_bytes']:.2f}×",
                         f"{a['seconds_per_step']:.1f}", f"{b['seconds_per_step']:.1f}",
                         f"{b['seconds_per_step'] / a['seconds_per_step']:.2f}×"])
    if not rows:
        return "\n".join(out + ["(no run has both `ours` and `ours-split` yet)"])
    out.append(report.table(["model", "update memory, joint", "update memory, split", "peak split ÷ joint",
                             "s/step joint", "s/step split", "time split ÷ joint"], rows))
    return "\n".join(out)


if __name__ == "__main__":
    main()
