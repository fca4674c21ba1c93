"""The rows of bench/gpu_memory.py with real random weights on a device (a GPU): the CUDA allocator's
peak beside ``LiveBytes`` and the fake-tensor figures, and wall-clock seconds.

    python -m d3po_studio.bench.gpu_memory --device cuda --budget-s 200   # ≈ 200 s on an H200
    python -m d3po_studio.bench.gpu_memory --device cuda --rewrite --results bench/results/gpu_memory_h200.json

``--rewrite`` writes the section again from a device run's JSON (``runs``, when the JSON has it,
says which runs were merged into it, when and at which commit, and which rows they skipped).
"""
from __future__ import annotations

import json
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from . import report
from .gpu_memory import (CARD, KEPT, NATIVE, RESULTS, SAMPLED_STEPS, SAMPLING_ONLY, STEPS, VARIANTS,
                         _breakdown, _linear_flops, _official_setup, _session_setup, _track_weights, build_pipeline,
                         gpu_seconds, parse_plan)
from .gpu_memory_report import _model, markdown, update_flops

DEVICE_RESULTS = RESULTS.with_name("gpu_memory_device.json")
DEVICE_VARIANTS = ["ours", "official", "ours-split", "ours-no-checkpointing", "ours-adamw32"]
# The card each family is checked against (issue 12's targets), and what the CUDA context takes of it.
CARDS_GIB = {"sd1": 8, "sdxl": 12}
CUDA_CONTEXT = 0.5e9
WITH_SAMPLING = ("ours", "official", "ours-sdpa")           # rows whose sampling is measured and timed too
# Most needed first, so that a run stopped by --budget-s or a timeout has them (≈ 200 s on an H200).
DEVICE_PLAN = [("sdxl:1024", "ours"), ("sd1:512", "ours"), ("sdxl:1024", "official"), ("sd1:512", "official"),
               *[(key, name) for key in ("sdxl:1024", "sd1:512")
                 for name in ("ours-split", "ours-no-checkpointing", "ours-adamw32")],
               ("sd2:768", "ours"), ("sd2:768", "official"), ("sdxl:1024", "ours-encoders-off")]


class DeviceClock:
    """Wall-clock seconds and the allocator's peak of a block on ``device``: synchronised, with
    ``torch.cuda.max_memory_allocated`` reset at its start on CUDA; seconds only elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def part(self, out: dict, key: str):
        """Writes ``out[key + "_seconds"]`` and ``out[key + "_device_peak_bytes"]`` (None off CUDA)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        yield
        self.sync()
        out[f"{key}_seconds"] = time.perf_counter() - started
        out[f"{key}_device_peak_bytes"] = torch.cuda.max_memory_allocated(self.device) if self.cuda else None


def measure_on_device(family: str, size: int, name: str, device: str, sampling: bool = False,
                      fractions: tuple[float, ...] = (1.0,), dtype: str = "auto", steps: int = STEPS) -> dict:
    """One configuration with real random weights on ``device``, as the session runs there (dtype,
    optimizer and attention "auto"; another ``dtype`` for a test). In order: a sampling of
    SAMPLED_STEPS steps and a click of KEPT kept steps under FlopCounterMode (FLOPs, and the
    warm-up); the same two under ``LiveBytes`` (peak of live bytes, and the CUDA allocator's peak
    of the same run; the click is the second, with the first's optimizer states alive); then,
    with no mode active, timed: a pair sampled with ``steps`` steps + decode, and one click of a
    ``steps``-step trajectory per train fraction in ``fractions``."""
    from ..core.memory import LiveBytes
    from .synthetic import synthetic_trajectory
    dev, v, started = torch.device(device), VARIANTS[name], time.perf_counter()
    clock, live = DeviceClock(dev), LiveBytes(dev.type)
    row = {"variant": name, "family": family, "size": size, "note": v.note, "fake": False, "device": str(dev),
           "kept_steps": KEPT, "steps": steps}
    with tempfile.TemporaryDirectory(prefix="d3po-gpu-memory-") as folder:
        pipe = build_pipeline(family, device=dev)
        setup = _official_setup if v.official else _session_setup
        with setup(pipe, nullcontext(), live, folder, v, size, KEPT, dtype, dev) as run:
            row.update(runtime_notes=run.notes, dtype=str(pipe.unet.dtype).removeprefix("torch."),
                       vae_slicing=bool(pipe.vae.use_slicing),
                       setup_seconds=time.perf_counter() - started)
            _track_weights(live, pipe, run)
            lora = [p.detach().clone() for p in run.params]
            if sampling or name in SAMPLING_ONLY:
                row["sampling"] = _device_sampling(run, live, clock, steps)
            if name not in SAMPLING_ONLY:
                traj = synthetic_trajectory(pipe, size, steps=steps, n=2)
                row.update(_device_clicks(run, traj, live, clock, fractions, lora))
                row["lora_changed"] = any(not torch.equal(a, b) for a, b in zip(lora, run.params))
    row["wall_seconds"] = time.perf_counter() - started
    return row


def _device_sampling(run, live, clock: DeviceClock, steps: int) -> dict:
    fixed, per_step = _linear_flops(lambda progress: run("sample", steps=SAMPLED_STEPS, progress=progress),
                                    SAMPLED_STEPS)
    out = {"flops": fixed + steps * per_step, "flops_fixed": fixed, "flops_per_step": per_step}
    live.reset_peak()
    with live, live.tagged("sampling activations"), clock.part(out, "measured"):
        run("sample", steps=SAMPLED_STEPS)
    out.update(peak_bytes=live.peak, at_peak=_breakdown(live.at_peak),
               device_peak_bytes=out.pop("measured_device_peak_bytes"))
    with clock.part(out, "timed"):
        run("sample", steps=steps)
    return out


def _device_clicks(run, traj, live, clock: DeviceClock, fractions, initial: list) -> dict:
    live.track([traj.latents, *traj.cond.values()], "trajectory")     # host tensors on a GPU: not counted
    failed: list[str] = []
    fixed, per_step = _linear_flops(lambda progress: _click(run, traj, failed, initial, progress=progress), STEPS)
    out = {"flops_fixed": fixed, "flops_per_kept_step": per_step}
    live.reset_peak()
    with live, live.tagged("update"), clock.part(out, "measured"):
        _click(run, traj, failed, initial)
    out.update(peak_bytes=live.peak, at_peak=_breakdown(live.at_peak),
               device_peak_bytes=out.pop("measured_device_peak_bytes"), timed=[])
    for fraction in fractions:
        timed, seen = {"train_fraction": fraction}, []
        with clock.part(timed, "update"):
            _click(run, traj, failed, initial, progress=lambda i, n: seen.append(n), fraction=fraction)
        out["timed"].append({**timed, "kept_steps": seen[-1] if seen else 0})
    return {**out, "failed_clicks": failed}


def _click(run, traj, failed: list, initial: list, **kw) -> None:
    """One update. A non-finite loss or step (possible with fp16 weights) is recorded, the LoRA
    set back to ``initial`` if the step made it non-finite, and the measurement goes on: the
    forwards and backwards ran either way; only that click's optimizer step is missing."""
    try:
        run("update", traj, **kw)
    except FloatingPointError as e:
        failed.append(str(e))
        with torch.no_grad():
            for p, p0 in zip(run.params, initial):
                if not torch.isfinite(p).all():
                    p.copy_(p0)


def device_fractions(family: str, name: str) -> tuple[float, ...]:
    """All kept steps, and for "ours" the family's default train_fraction when it has one."""
    from ..core.opening import FAMILY_DEFAULTS
    fraction = FAMILY_DEFAULTS.get(family, {}).get("train_fraction")
    return (1.0, fraction) if name == "ours" and fraction else (1.0,)


def run_on_device(plan: list[tuple[str, str]], device: str, budget_s: float | None = None, log=print,
                  on_result=None, started: float | None = None, steps: int = STEPS) -> list[dict]:
    """Each (family:size, variant) with real tensors on ``device``, in order; a row that fails (out
    of memory or anything else) records its error and the next one runs. A row is skipped when
    the seconds since ``started`` plus those of its model's previous row would pass ``budget_s``
    (a later, cheaper row may still run); ``on_result(results so far)`` after each."""
    import gc
    started = time.perf_counter() if started is None else started
    results, last = [], {}          # last: seconds of the latest row of each family:size
    for key, name in plan:
        elapsed = time.perf_counter() - started
        if budget_s is not None and elapsed + last.get(key, 0.0) > budget_s:
            log(f"{key} {name}: not started, {elapsed:.0f} s + {last.get(key, 0.0):.0f} s (its model's last "
                f"row) would pass --budget-s {budget_s:g}")
            continue
        family, size = key.split(":")
        row_started = time.perf_counter()
        try:
            row = measure_on_device(family, int(size), name, device, sampling=name in WITH_SAMPLING,
                                    fractions=device_fractions(family, name), steps=steps)
        except Exception as e:  # noqa: BLE001 - recorded in the row (OOM included); the plan goes on
            row = {"variant": name, "family": family, "size": int(size), "fake": False, "device": device,
                   "error": f"{type(e).__name__}: {e}"[:800], "wall_seconds": time.perf_counter() - row_started}
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
        log(f"{key} {name}: {_summary(row)} [{time.perf_counter() - started:.0f} s so far]")
        last[key] = row.get("wall_seconds", 0.0)
        results.append(row)
        if on_result:
            on_result(results)
    return results


def _summary(row: dict) -> str:
    if "error" in row:
        return row["error"]
    if "timed" not in row:
        return f"sampling peak {report.gb(row['sampling']['peak_bytes'])} live, " \
               f"{_gb_or_dash(row['sampling']['device_peak_bytes'])} CUDA"
    times = ", ".join("%.2f s (%d kept steps)" % (t["update_seconds"], t["kept_steps"]) for t in row["timed"])
    return (f"update peak {report.gb(row['peak_bytes'])} live, {_gb_or_dash(row['device_peak_bytes'])} CUDA; "
            f"update {times}" + (f"; sampling {row['sampling']['timed_seconds']:.2f} s" if "sampling" in row else "")
            + (f"; {len(row['failed_clicks'])} click(s) not finite: {row['failed_clicks'][0]}"
               if row.get("failed_clicks") else ""))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _gb_or_dash(n_bytes) -> str:
    return "—" if n_bytes is None else report.gb(n_bytes)


def device_markdown(results: list[dict], command: str, environment: dict, runs: list[dict] | None = None,
                    notes: list[str] | None = None, primary: bool = True) -> str:
    """Memory and seconds measured on the device, beside the fake-tensor figures of RESULTS; ``runs``
    (merged runs: when, which commit, what they skipped) and ``notes`` (paragraphs) from the JSON.
    ``primary``: the main GPU section, which also lists the rows no run measured."""
    fake = {}
    if RESULTS.exists():
        fake = {(r["family"], r["size"], r["variant"]): r for r in json.loads(RESULTS.read_text())["results"]}
    out = [f"## GPU memory and time of a click, measured on {environment['gpu']}\n",
           f"{environment['gpu']}, torch {environment['torch']}, {environment['packages']}. "
           f"Date: {environment['date']}. Command: `{command}`.\n", *_runs(runs or [], results, fake, primary), DEVICE_INTRO]
    choices = next((r["runtime_notes"] for r in results if r.get("variant") == "ours" and "runtime_notes" in r), [])
    if choices:
        out.append("The session's automatic choices there: " + "; ".join(choices) + ".\n")
    out += _device_memory_table(results, fake) + _gap_table(results) + _estimate_against_cuda(results)
    out += _device_time_table(results) + [f"{note}\n" for note in notes or []]
    errors = [f"- {_model(r)}, {r['variant']}: "
              + (f"`{r['error']}`" if "error" in r else
                 f"{len(r['failed_clicks'])} click(s) not stepped (`{r['failed_clicks'][0]}`)")
              for r in results if "error" in r or r.get("failed_clicks")]
    return "\n".join(out + (["Rows that failed, or clicks whose loss or step was not finite:\n", *errors, ""]
                            if errors else []))


def _runs(runs: list[dict], results: list[dict], fake: dict, primary: bool = True) -> list[str]:
    """What ran where and when, which rows no run reached (their figures are fake-tensor only)."""
    if not runs:
        return []
    ran = {f"{r['family']}:{r['size']} {r['variant']}" for r in results if "error" not in r}
    lines = [f"- run {r['run']}, started {r['started']}, code at about commit {r['code']}: `{r['command']}`; "
             f"{_count(sum(x.get('run') == r['run'] for x in results), 'row')}" for r in runs]
    skipped = list(dict.fromkeys(k for r in runs for k in r["skipped"] if k not in ran))
    unplanned = [f"{family}:{size} {name}" for family, size, name in fake
                 if f"{family}:{size} {name}" not in ran and f"{family}:{size} {name}" not in skipped
                 and size == NATIVE.get(family)]
    head = (f"{len(runs)} runs on this GPU, merged (the figures of all rows below are from them):\n" if len(runs) > 1
            else "One run on this GPU (the figures of all rows below are from it):\n")
    unmeasured = ["Not measured on the GPU, so **fake-tensor figures only**: skipped by `--budget-s` in every run that "
                  f"planned them: {', '.join(skipped) or 'none'}; not in the device plan: {', '.join(unplanned) or 'none'} "
                  "(ours' sampling on the GPU decodes one image at a time, the configuration of ours-vae-slicing).\n"]
    return [head, *lines, "", *(unmeasured if primary else []),
            "**Which figures are which.** Measured on the GPU: the columns *CUDA peak*, *live bytes (real)* and "
            "*seconds*, and TFLOP/s achieved. Fake-tensor figures (computed on a CPU without a GPU): the column "
            "*live bytes (fake)* and every table of the section \"measured with fake tensors\" below. Estimates: "
            f"seconds on an {CARD['name']} (from counted FLOPs) and `core.memory.estimate_bytes`.\n"]


DEVICE_INTRO = (
    "Real tensors with random weights (built on the GPU from the shipped configs, cast as `Session.open` "
    "casts them), the same code and plan as the fake-tensor section: a pair with CFG 5 at the native size; "
    "the update's peak is that of a second click (the first click's optimizer states alive), with "
    f"{KEPT} kept steps (one step's graph at a time, so 20 kept steps peak the same: the timed click's "
    "peak shows it). CUDA peak = `torch.cuda.max_memory_allocated` over the part, reset at its start; "
    "live bytes = `core.memory.LiveBytes` in the same run; fake = the fake-tensor figure below (for "
    "ours' sampling that of ours-vae-slicing: `Session.open` now decodes one image at a time). "
    "Seconds: wall clock between `torch.cuda.synchronize` calls, after a warm-up, without any "
    "dispatch mode active.\n")


def _device_memory_table(results: list[dict], fake: dict) -> list[str]:
    head = ["model", "config", "what", "CUDA peak", "live bytes (real)", "live bytes (fake)", "fake ÷ CUDA",
            "CUDA ÷ official", "optimizer states at peak"]
    rows = []
    for r in (r for r in results if "error" not in r):
        official = _official_of(r, results) or {}
        fake_update = fake.get((r["family"], r["size"], r["variant"]), {})
        fake_sampling = fake.get((r["family"], r["size"], "ours-vae-slicing" if r["variant"] == "ours"
                                  else r["variant"]), {}).get("sampling", {})
        parts = [("update", r if "timed" in r else None, official, fake_update),
                 ("sampling a pair", r.get("sampling"), official.get("sampling"), fake_sampling)]
        for what, part, of, fk in parts:
            if part:
                rows.append([_model(r), r["variant"], what, *_peaks(part, of, fk),
                             report.gb(part["at_peak"]["optimizer states"]) if what == "update" else ""])
    return ["### Peak memory\n", report.table(head, rows), ""] if rows else []


def _official_of(r: dict, results: list[dict]) -> dict | None:
    return next((o for o in results if "error" not in o and o["variant"] == "official"
                 and (o["family"], o["size"]) == (r["family"], r["size"])), None)


def _peaks(part: dict, official: dict | None, fake: dict) -> list[str]:
    """CUDA peak, live bytes, fake live bytes, fake ÷ CUDA, CUDA ÷ official's CUDA."""
    cuda, fake_peak = part["device_peak_bytes"], fake.get("peak_bytes")
    of = (official or {}).get("device_peak_bytes")
    return [f"**{_gb_or_dash(cuda)}**", report.gb(part["peak_bytes"]), _gb_or_dash(fake_peak),
            f"{fake_peak / cuda:.2f}" if cuda and fake_peak else "—", f"{cuda / of:.2f}×" if cuda and of else "—"]


def _gap_table(results: list[dict]) -> list[str]:
    """CUDA peak − live bytes of the same run, per row and part: memory torch's allocator gave out
    that no tensor held (workspaces of ops, rounding), per pixel processed at once."""
    rows = []
    for r in (r for r in results if "error" not in r):
        for what, part, images in (("update", r if "timed" in r else None, 1),
                                   ("sampling a pair", r.get("sampling"), 1 if r.get("vae_slicing") else 2)):
            if part and part.get("device_peak_bytes"):
                gap = part["device_peak_bytes"] - part["peak_bytes"]
                pixels = images * r["size"] ** 2
                decoded = f"{images} at once" if what != "update" else "—"
                rows.append([_model(r), r["variant"], what, decoded, report.gb(gap), f"{gap / pixels:,.0f}"])
    if not rows:
        return []
    return ["### CUDA peak beyond the live tensors\n",
            "CUDA peak − live bytes (real) of the same run: bytes the allocator handed out that no tensor an "
            "operator returned held (an op's own workspace, allocator rounding). Per pixel = ÷ (image pixels × "
            "images the VAE decoded at once; for an update, one image's pixels).\n",
            report.table(["model", "config", "what", "VAE decode", "CUDA − live", "bytes per pixel"], rows), ""]


def _estimate_against_cuda(results: list[dict]) -> list[str]:
    """``core.memory.estimate_bytes`` (the fit warning's, with the CUDA excess) against the CUDA peaks
    of ours at each family's native size, and what a click needs on a stated card."""
    from ..core.memory import MEASURED, estimate_bytes, fit_warning
    rows, verdicts = [], []
    for r in results:
        family = r.get("family")
        if r.get("variant") != "ours" or "error" in r or family not in MEASURED or r["size"] != NATIVE[family]:
            continue
        est = estimate_bytes(family, r["size"], r["size"])
        for what, key, cuda in (("update", "update", r.get("device_peak_bytes")),
                                ("sampling a pair", "sampling", r.get("sampling", {}).get("device_peak_bytes")),
                                ("sampling, text encoders on the host for the decode", "sampling_encoders_off", None),
                                ("a click (the larger of the last and the update)", "click", None)):
            rows.append([_model(r), what, report.gb(est[key]), _gb_or_dash(cuda),
                         f"{est[key] / cuda - 1:+.1%}" if cuda else "not measured on this GPU"])
        gib = CARDS_GIB.get(family)
        if gib:
            free = gib * 2 ** 30 - CUDA_CONTEXT
            warning = fit_warning(family, r["size"], r["size"], free)
            verdict = f"fits, {report.gb(free - est['click'])} to spare" if warning is None else \
                f"does not fit, {report.gb(est['click'] - free)} short: {warning}"
            verdicts.append(f"{_model(r)} on a {gib} GB card ({gib} GiB less {CUDA_CONTEXT / 1e9:.1f} GB for "
                            f"the CUDA context = {report.gb(free)} free at best): a click needs "
                            f"{report.gb(est['click'])} by the estimate, {verdict}.")
    if not rows:
        return []
    return ["### The fit warning's estimate against the CUDA peaks\n",
            "`core.memory.estimate_bytes` (what `fit_warning`, the app and the Load node use): the fake-tensor "
            "live bytes of `core.memory.MEASURED` plus the CUDA excess measured here (`cuda_update`, "
            "`cuda_decode`), at the defaults (a pair, joint backward, checkpointing):\n",
            report.table(["model", "what", "estimate", "CUDA peak", "estimate ÷ CUDA − 1"], rows), "",
            *[f"- {v}" for v in verdicts], ""]


def _device_time_table(results: list[dict]) -> list[str]:
    head = ["model", "config", "sampling a pair (steps + decode)", "update, kept steps", "seconds",
            "TFLOP", "TFLOP/s achieved", "÷ official", f"{CARD['name']} estimate"]
    rows = []
    for r in (r for r in results if "error" not in r):
        official_timed = (_official_of(r, results) or {}).get("timed", [])
        if "timed" not in r:                     # a sampling-only row
            rows.append([_model(r), r["variant"], f"{r['sampling']['timed_seconds']:.2f} s ({r.get('steps', STEPS)})",
                         "—", "", "", "", "", ""])
        for i, t in enumerate(r.get("timed", [])):
            flops, seconds = update_flops(r, t["kept_steps"]), t["update_seconds"]
            base = next((o["update_seconds"] for o in official_timed if o["kept_steps"] == t["kept_steps"]), None)
            sampling = f"{r['sampling']['timed_seconds']:.2f} s ({r.get('steps', STEPS)})" \
                if "sampling" in r and i == 0 else ""
            kept = f"{t['kept_steps']} (train_fraction {t['train_fraction']:g})"
            rows.append([_model(r), r["variant"], sampling, kept, f"**{seconds:.2f} s**", f"{flops / 1e12:.0f}", f"{flops / seconds / 1e12:.0f}",
                         f"{seconds / base:.2f}×" if base else "—", f"{gpu_seconds(flops):.1f} s"])
    return ["### Seconds\n", "TFLOP counted by `FlopCounterMode` in the warm-up runs (matmuls, convolutions, "
            "attention); the estimate is what the fake-tensor section's method gives for "
            f"{CARD['name']} ({CARD['utilisation']:.0%} of its fp16 dense peak).\n",
            report.table(head, rows), ""] if rows else []


def device_environment(device: str) -> dict:
    import importlib.metadata as md
    dev = torch.device(device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{dev.type} (no GPU)"
    packages = []
    for name in ("diffusers", "transformers", "bitsandbytes", "peft"):
        try:
            packages.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            packages.append(f"no {name}")
    return {"gpu": gpu, "torch": torch.__version__, "packages": ", ".join(packages),
            "date": time.strftime("%Y-%m-%d")}


def write_device(results: list[dict], command: str, environment: dict, doc, results_path,
                 runs: list[dict] | None = None, notes: list[str] | None = None,
                 section: str = "gpu_memory") -> None:
    """The device run's JSON, and the ``section`` of ``doc``: the device's tables, then (in the
    main "gpu_memory" section) the fake-tensor ones of RESULTS. ``runs`` and ``notes``: kept in
    the JSON, see device_markdown."""
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "environment": environment, "card": CARD,
               **({"runs": runs} if runs else {}), **({"notes": notes} if notes else {}), "results": results}
    Path(results_path).write_text(json.dumps(payload, indent=1))
    primary = section == "gpu_memory"
    text = device_markdown(results, command, environment, runs, notes, primary)
    if RESULTS.exists() and primary:
        fake = json.loads(RESULTS.read_text())
        text += "\n" + markdown(fake["results"], fake["command"])
    report.write_section(section, text, doc)


def parse_device_plan(items: list[str] | None, variants: list[str] | None) -> list[tuple[str, str]]:
    """DEVICE_PLAN, or each ``--plan`` item with ``variants`` (default DEVICE_VARIANTS)."""
    if not items:
        return [(key, name) for key, name in DEVICE_PLAN if not variants or name in variants]
    plan = parse_plan(items, variants or DEVICE_VARIANTS)
    return [(key, name) for key, names in plan.items() for name in names]


def main_on_device(a, command: str) -> None:
    """``--device`` of bench/gpu_memory.py's command line."""
    import logging
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the auto choices
    results_path = DEVICE_RESULTS if a.results == str(RESULTS) else Path(a.results)
    if a.rewrite:
        payload = json.loads(results_path.read_text())
        write_device(payload["results"], payload["command"], payload["environment"], a.doc, results_path,
                     payload.get("runs"), payload.get("notes"), a.section)
        return
    environment = device_environment(a.device)
    print(f"{environment['gpu']}, torch {environment['torch']}, {environment['packages']}", flush=True)
    run_on_device(parse_device_plan(a.plan, a.variants), a.device, a.budget_s, started=started, steps=a.steps,
                  log=lambda line: print(line, flush=True),
                  on_result=lambda results: write_device(results, command, environment, a.doc, results_path,
                                                         section=a.section))
