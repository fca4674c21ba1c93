"""The "gpu_memory" section of docs/benchmarks.md from bench/gpu_memory.py's fake-tensor rows, and
``core.memory.MEASURED`` from the same rows (plus the CUDA rows of bench/gpu_memory_device.py).

    python -m d3po_studio.bench.gpu_memory --rewrite     # the section again from bench/results/gpu_memory.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from . import report
from .gpu_memory import CARD, KEPT, LABELS, NATIVE, RESULTS, SAMPLING_ONLY, STEPS, VARIANTS, gpu_seconds

CUDA_RESULTS = RESULTS.with_name("gpu_memory_h200.json")   # the GPU run core.memory.MEASURED takes its CUDA excess from


def update_flops(row: dict, kept_steps: int) -> float:
    """FLOPs of a whole update that trains ``kept_steps`` kept steps (measured per kept step)."""
    return row["flops_fixed"] + kept_steps * row["flops_per_kept_step"]


def max_kept_steps(row: dict, seconds: float) -> int:
    """The most kept steps whose update stays within ``seconds`` on ``CARD`` (estimate)."""
    budget = seconds * CARD["fp16_dense_tflops"] * 1e12 * CARD["utilisation"] - row["flops_fixed"]
    return max(0, int(budget // row["flops_per_kept_step"]))


def measured_constants(results: list[dict], device_results: list[dict] = ()) -> dict:
    """``core.memory.MEASURED`` from the rows measured at each family's native size: the update of
    "ours", its sampling as shipped (the VAE decoding one image at a time; rows measured before
    ``Session.open`` did it give way to ours-vae-slicing), and the text encoders' bytes, which
    ours-encoders-off moves off for the decode; with ``device_results`` (real tensors on a GPU),
    the CUDA allocator's excess over the live bytes (``cuda_excess``)."""
    out = {}
    for family, size in NATIVE.items():
        by = {r["variant"]: r for r in results if r["family"] == family and r["size"] == size}
        ours = by.get("ours")
        smp = shipped_sampling(by)
        if not ours or smp is None:
            continue
        b = ours["at_peak"]
        weights = b["UNet"] + b["LoRA"] + b["LoRA grads"] + b["optimizer states"]
        encoders = smp["at_peak"]["text encoders + VAE"]
        update = {key: by[name]["peak_bytes"] - weights for name, key in
                  (("ours", (True, "joint")), ("ours-split", (True, "split")),
                   ("ours-no-checkpointing", (False, "joint"))) if name in by}
        out[family] = {"size": size, "weights": weights, "encoders": encoders, "sampling": _activations(smp),
                       "update": update}
        denoise = by.get("ours-no-decode", {}).get("sampling")
        if denoise:
            out[family]["denoise"] = _activations(denoise)
        off = by.get("ours-encoders-off", {}).get("sampling")
        if off:
            out[family]["text_encoders"] = encoders - off["at_peak"]["text encoders + VAE"]
        out[family].update(cuda_excess(device_results, family, size))
    return out


def cuda_excess(device_results: list[dict], family: str, size: int) -> dict[str, int]:
    """CUDA peak − live bytes of the same run, the largest over ``family``'s rows of the session's
    code (not the official recipe) at ``size``: of an update ("cuda_update") and of a sampling whose
    VAE decoded one image at a time ("cuda_decode", its peak is the decode); a key is absent when
    no such row was measured on a GPU."""
    rows = [r for r in device_results if (r.get("family"), r.get("size")) == (family, size) and "error" not in r
            and not VARIANTS[r["variant"]].official]
    parts = {"cuda_update": [r for r in rows if "timed" in r],
             "cuda_decode": [r["sampling"] for r in rows if "sampling" in r and r.get("vae_slicing")]}
    return {key: max(p["device_peak_bytes"] - p["peak_bytes"] for p in found)
            for key, found in parts.items() if found and all(p.get("device_peak_bytes") for p in found)}


def _activations(sampling: dict) -> int:
    """A sampling peak less the weights live at it: UNet, LoRA, text encoders and VAE."""
    b = sampling["at_peak"]
    return sampling["peak_bytes"] - b["UNet"] - b["LoRA"] - b["text encoders + VAE"]


def shipped_sampling(by: dict[str, dict]) -> dict | None:
    """The sampling measurement of the configuration as shipped, among rows by variant name."""
    for name in ("ours", "ours-vae-slicing"):
        r = by.get(name)
        if r and "sampling" in r and sliced(r):
            return r["sampling"]
    return None


def sliced(row: dict) -> bool:
    """Whether the row's VAE decoded one image at a time (recorded since Session.open does it)."""
    return row.get("vae_slicing", VARIANTS[row["variant"]].vae_slicing)


def markdown(results: list[dict], command: str) -> str:
    """The "gpu_memory" section: per model, the variants side by side, then FLOPs and seconds."""
    out = [f"## GPU memory of a click, measured with fake tensors\n\nMachine: {report.machine()}. "
           f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.\n", INTRO]
    for key in dict.fromkeys(f"{r['family']}:{r['size']}" for r in results):
        rows = [r for r in results if f"{r['family']}:{r['size']}" == key]
        out += _memory_table(rows)
    out += _estimate_check(results)
    out += _time_table([r for r in results if "flops_fixed" in r])
    return "\n".join(out)


INTRO = (
    "Peak of live tensor bytes (`core.memory.LiveBytes`) of the project's own code on full-size "
    "pipelines built from the shipped configs with fake tensors (fp16 weights, fp32 VAE and LoRA; fake "
    "CPU tensors standing for the GPU, see `bench/gpu_memory.py`): a session's update of one pair with "
    f"CFG 5 at the native size, two clicks (the optimizer states of the first alive in the second), "
    f"{KEPT} kept steps per click (one step's graph at a time, so a 20-step update peaks the same). "
    "Peak = what torch's CUDA allocator would have to hold, without fragmentation and without the "
    "CUDA context (≈ 0.3–0.5 GB more in nvidia-smi). \"at the peak\" splits it by owner; activations "
    "= every other live tensor (the graph saved for backward, attention and temporaries).\n")


def _memory_table(rows: list[dict]) -> list[str]:
    family, size = rows[0]["family"], rows[0]["size"]
    by = {r["variant"]: r for r in rows}
    official, ours = by.get("official"), by.get("ours")
    head = ["what runs", "config", "peak", "UNet + LoRA", "text enc. + VAE", "ref. copy", "grads + opt. states",
            "activations", "÷ official", "what"]
    table = [_row("update (2 clicks)", r, official) for r in rows if "peak_bytes" in r]
    table += [_row("sampling a pair", {**r["sampling"], "variant": r["variant"], "note": r["note"] if
                                       r["variant"] != "ours" else _sampling_note(r)}, None)
              for r in rows if "sampling" in r]
    lines = [f"### {LABELS.get(family, family)} at {size}×{size} px\n", report.table(head, table), ""]
    if ours and official:
        lines.append(f"Update, ours ÷ official: **{ours['peak_bytes'] / official['peak_bytes']:.2f}×** of the peak.")
    savings = [f"{VARIANTS[n].note}: {_signed(by[n]['peak_bytes'] - ours['peak_bytes'])}"
               for n in by if ours and n.startswith("ours-") and "peak_bytes" in by[n]]
    if savings:
        lines.append("Each saving of the update, as the peak with it undone − ours: " + "; ".join(savings) + ".")
    vae = [f"{VARIANTS[n].note.removeprefix('+ ')}: "
           f"{_signed(by[n]['sampling']['peak_bytes'] - by[VARIANTS[n].baseline]['sampling']['peak_bytes'])}"
           + (f" (against {VARIANTS[n].baseline})" if VARIANTS[n].baseline != "ours" else "")
           for n in SAMPLING_ONLY if n in by and VARIANTS[n].decode and "sampling" in by.get(VARIANTS[n].baseline, {})]
    if vae:
        lines.append("Each saving of the sampling peak against ours: " + "; ".join(vae) + ".")
    return lines + [""]


def _sampling_note(r: dict) -> str:
    if sliced(r):
        return f"{STEPS} steps + VAE decode of 2 images, one at a time"
    return (f"{STEPS} steps + VAE decode of 2 images at once (measured before `Session.open` sliced the "
            "decode: as shipped = ours-vae-slicing)")


def _row(what: str, r: dict, official: dict | None) -> list:
    b = r["at_peak"]
    return [what, r["variant"], f"**{report.gb(r['peak_bytes'])}**", report.gb(b["UNet"] + b["LoRA"]),
            report.gb(b["text encoders + VAE"]), report.gb(b["reference UNet copy"]),
            report.gb(b["LoRA grads"] + b["optimizer states"]), report.gb(b["activations"] + b["trajectory"]),
            f"{r['peak_bytes'] / official['peak_bytes']:.2f}×" if official else "—", r["note"]]


def _estimate_check(results: list[dict]) -> list[str]:
    """``core.memory.estimate_bytes`` from the native-size rows against measurements at other
    sizes: the update of "ours", the sampling as shipped (``shipped_sampling``)."""
    from ..core.memory import estimate_bytes
    measured = measured_constants(results)
    rows = []
    for key in dict.fromkeys((r["family"], r["size"]) for r in results):
        family, size = key
        if size == NATIVE.get(family) or family not in measured:
            continue
        by = {r["variant"]: r for r in results if (r["family"], r["size"]) == key}
        est = estimate_bytes(family, size, size, measured=measured)
        for part, got in (("update", by.get("ours", {}).get("peak_bytes")),
                          ("sampling", (shipped_sampling(by) or {}).get("peak_bytes"))):
            if got:
                rows.append([f"{LABELS.get(family, family)} at {size} px, {part}", report.gb(est[part]),
                             report.gb(got), f"{est[part] / got - 1:+.0%}"])
    if not rows:
        return []
    return ["### The fit warning's estimate against a measurement at another size\n",
            "`core.memory.estimate_bytes` (used by `fit_warning`) scales the activations measured at the "
            "native size by the pixel count, an update's only upward (they do not shrink in proportion); here "
            "from the fake-tensor rows alone, live bytes against live bytes (the fit warning adds the CUDA "
            "excess measured on a GPU, section above):\n",
            report.table(["what", "estimate", "measured", "error"], rows), ""]


def _signed(n_bytes: float) -> str:
    return ("+" if n_bytes >= 0 else "−") + report.gb(abs(n_bytes))


def _time_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    out = [f"### Time on a GPU: an ESTIMATE from counted FLOPs\n",
           f"FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` in the same fake run (matmuls, "
           f"convolutions and attention; elementwise ops not counted), turned into seconds on an "
           f"{CARD['name']} at {CARD['utilisation']:.0%} of its fp16 dense peak of "
           f"{CARD['fp16_dense_tflops']} TFLOPS ({CARD['source']}). An update's FLOPs = fixed part (trust "
           f"region forwards, optimizer) + kept steps × FLOPs per kept step, both measured. "
           f"Not measured on a GPU.\n"]
    head = ["model", "sampling a pair (TFLOP)", "≈ s", "per kept step (TFLOP)", "update, 20 kept steps (TFLOP)",
            "≈ s", "kept steps within 10 s", "train_fraction for ≤ 10 s"]
    table = []
    for r in rows:
        smp = r.get("sampling", {})
        full = update_flops(r, STEPS)
        k = max_kept_steps(r, 10.0)
        label = _model(r) + ("" if r["variant"] == "ours" else f", {r['variant']}")
        table.append([label,
                      *((f"{smp['flops'] / 1e12:.1f}", f"{gpu_seconds(smp['flops']):.1f}") if "flops" in smp
                        else ("—", "—")),
                      f"{r['flops_per_kept_step'] / 1e12:.2f}", f"{full / 1e12:.1f}", f"{gpu_seconds(full):.1f}",
                      str(min(k, STEPS)), f"{min(1.0, k / STEPS):.2f}"])
    return out + [report.table(head, table), ""]


def write_all(results: list[dict], command: str, doc, results_path) -> None:
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "card": CARD, "results": results}
    Path(results_path).write_text(json.dumps(payload, indent=1))
    report.write_section("gpu_memory", markdown(results, command), doc)

def _model(r: dict) -> str:
    return f"{LABELS.get(r['family'], r['family'])} at {r['size']} px"
