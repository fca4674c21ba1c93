"""An ESTIMATE of peak GPU memory of one update for SD 1.5 (512 px) and SDXL (1024 px), built
from parts measured on the CPU by bench/memory.py (no GPU was available):

    fp16 frozen weights (UNet, + a copy for the official reference, + text encoder(s) and VAE
    that the app keeps loaded)  +  LoRA weights, gradients and optimizer states (counted)
    +  activations of one kept step (the measured peak above the loaded model, scaled by pixel
    count when measured at a smaller size)

    python -m d3po_studio.bench.estimate          # from bench/results/memory.json

Parameter counts come from the published configs (models built on the meta device: no memory).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from . import report
from .memory import RESULTS
from .synthetic import CONFIGS

TARGET_SIZE = {"sd1": 512, "sdxl": 1024}
HALF = 2                                          # bytes per fp16 weight
OPTIMIZER_STATE_BYTES = {"adamw8bit": 2, "adamw": 8}   # per LoRA parameter (two moments)
CUDA_CONTEXT = 0.5e9                              # CUDA context + kernels, outside torch's allocator


def resident_parameters(family: str) -> int:
    """Parameters of the text encoder(s) and VAE of ``family`` (the app keeps them loaded)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    total = 0
    with torch.device("meta"):
        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            path = CONFIGS / family / name / "config.json"
            if path.exists():
                model = cls(CLIPTextConfig.from_dict(json.loads(path.read_text())))
                total += sum(p.numel() for p in model.parameters())
        vae = AutoencoderKL.from_config(json.loads((CONFIGS / family / "vae" / "config.json").read_text()))
        total += sum(p.numel() for p in vae.parameters())
    return total


def attention_matrix_bytes(family: str, size: int, samples: int, bytes_per: int = HALF) -> float:
    """Bytes of the self-attention probability matrices that classic attention keeps for backward:
    per self-attention layer samples × heads × N² (N = tokens at that layer's resolution)."""
    cfg = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    levels = len(cfg["block_out_channels"])
    heads = cfg["attention_head_dim"]          # diffusers' SD configs store the head count here
    heads = heads if isinstance(heads, list) else [heads] * levels
    depth = cfg.get("transformer_layers_per_block", 1)
    depth = depth if isinstance(depth, list) else [depth] * levels
    layers = cfg["layers_per_block"]
    total = 0.0
    for i, kind in enumerate(cfg["down_block_types"]):
        tokens = (size // 8 // 2 ** i) ** 2
        per_layer = samples * heads[i] * tokens ** 2 * bytes_per
        if kind.startswith("CrossAttn"):
            total += per_layer * depth[i] * (2 * layers + 1)      # down blocks + up blocks (one more)
        if i == levels - 1:
            total += per_layer * depth[i]                            # mid block
    return total


def estimate(rows: dict[str, dict], family: str) -> dict[str, dict[str, float]]:
    """Bytes per component for each measured variant of ``family`` at its target size."""
    resident = resident_parameters(family)
    out = {}
    for name, r in rows.items():
        scale = (TARGET_SIZE[family] / r["size"]) ** 2
        copies = 2 if r["reference"] == "copy" else 1
        lora = r["lora_parameters"] * (4 + 4 + OPTIMIZER_STATE_BYTES[r["optimizer"]])
        parts = {"unet": r["unet_parameters"] * HALF * copies, "resident": resident * HALF, "lora": lora,
                 "activations": (r["peak_bytes"] - r["setup_bytes"]) * scale}
        if r["attention"] == "classic":         # its attention matrices grow with pixels², not pixels
            samples = 4                          # 2 images × CFG batch 2, all alive until backward
            parts["activations"] += (attention_matrix_bytes(family, TARGET_SIZE[family], samples)
                                     - scale * attention_matrix_bytes(family, r["size"], samples))
        parts["total"] = sum(parts.values())
        parts["with_context"] = parts["total"] + CUDA_CONTEXT
        parts["scale"] = scale
        out[name] = parts
    return out


def markdown(results: list[dict]) -> str:
    out = ["## GPU memory scaled from CPU RSS: the old ESTIMATE, kept as a cross-check\n",
           "Superseded by the measurements at native size (sections \"GPU memory and time of a click, "
           "measured on NVIDIA H200\" and \"GPU memory of a click, measured with fake tensors\" above, "
           "`bench/gpu_memory.py`): scaling the whole 256 px RSS update part by the pixel ratio overstates "
           "the activations (SDXL update: 32 GB here, 8.07 GB measured on the H200). "
           "Made when no GPU was available. Peak GPU memory of one update with fp16 weights, built from parts: "
           "fp16 weights counted from the published configs (UNet, the reference copy where there is "
           "one, and the text encoder(s) + VAE that the app keeps loaded); LoRA weights + gradients (fp32) "
           "+ optimizer states (8-bit: 2 B/param, 32-bit: 8 B/param); activations of one kept step = "
           "the update's peak above the loaded model measured on the CPU in bf16 (same size as fp16) "
           "by the memory benchmark, multiplied by the pixel ratio when measured at a smaller size "
           "(activations grow with pixels; SDPA keeps no attention matrix); for classic attention "
           "(the official recipe) the attention probability matrices it keeps grow with pixels², so "
           "they are counted exactly (samples × heads × tokens² × 2 B per self-attention layer) and "
           "only the rest is scaled. Scaling the whole measured update part also scales its fixed part "
           "(cross-attention on 77 text tokens, allocator slack), so the scaled figures are upper bounds, "
           "the more so the larger the factor (× 16 for SDXL). CPU peak RSS counts "
           "allocator slack that CUDA's max-allocated also has in some form; add ~0.5 GB for the CUDA "
           "context to compare with nvidia-smi.\n"]
    for family, target in TARGET_SIZE.items():
        rows = {r["variant"]: r for r in results if r.get("family") == family and "error" not in r}
        if not rows:
            continue
        est = estimate(rows, family)
        names = [n for n in ("ours", "ours-split", "ours-no-checkpointing", "official") if n in est]
        size = rows[names[0]]["size"]
        scaled = "" if size == target else f", × {est[names[0]]['scale']:.0f}"
        out.append(f"### {family} at {target}×{target} px (activations measured at {size} px{scaled})\n")
        labels = [("unet", "UNet fp16 (× 2 with a reference copy)"), ("resident", "text encoder(s) + VAE fp16"),
                  ("lora", "LoRA + grads + optimizer states"), ("activations", "activations of one kept step"),
                  ("total", "**total (torch allocated)**"), ("with_context", "+ CUDA context (≈ nvidia-smi)")]
        out.append(report.table(["part"] + names,
                                [[label] + [report.gb(est[n][key]) for n in names] for key, label in labels]))
        if "ours" in est and "official" in est:
            out.append(f"\nEstimated ours / official at {target} px: "
                       f"**{est['ours']['total'] / est['official']['total']:.2f}×**.")
        if family == "sd1" and "ours" in est:
            total = est["ours"]["total"]
            out.append(f"\nSD 1.5 update, ours as shipped: **≈ {report.gb(total)}** by this estimate "
                       f"(target ≤ 6 GB: {'met' if total <= 6e9 else 'not met'}).")
        out.append("")
    return "\n".join(out)


def write_estimate(results: list[dict], doc=report.DEFAULT_PATH) -> None:
    report.write_section("estimate", markdown(results), doc)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--doc", default=str(report.DEFAULT_PATH))
    a = p.parse_args(argv)
    write_estimate(json.loads(Path(a.results).read_text()), a.doc)


if __name__ == "__main__":
    main()
