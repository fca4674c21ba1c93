"""GPU memory and time of one click at native resolution: fake tensors on a CPU, or real ones on a GPU.

    OMP_NUM_THREADS=1 nice -n 10 python -m d3po_studio.bench.gpu_memory   # hours on 2 loaded cores
    python -m d3po_studio.bench.gpu_memory --plan sd1:256 --variants ours --doc /tmp/b.md  # smoke
    python -m d3po_studio.bench.gpu_memory --device cuda --budget-s 200   # ≈ 200 s on an H200
    python -m d3po_studio.bench.gpu_memory --device cpu --plan tiny-sd1:16 --steps 4 --doc /tmp/b.md  # its smoke

With ``--device``, the same rows run with real random weights built on the device
(bench/gpu_memory_device.py): ``torch.cuda.max_memory_allocated`` beside ``LiveBytes`` and the
fake figures, and wall-clock seconds of a sampled pair and of an update (DEVICE_PLAN, most needed
first). The section's tables are written by bench/gpu_memory_report.py; this module measures.

Full-size SD 1.5, SD 2.1 (768 px, v-prediction) and SDXL pipelines are built from the shipped
configs (``core/configs/``) under ``FakeTensorMode``: every tensor has its shape, dtype and device
and no data, so a forward and backward of a full UNet runs in seconds and allocates nothing.
``core.memory.LiveBytes`` adds up the bytes of the live tensor storages; its peak is what a GPU
allocator must hold, less fragmentation (tests/test_gpu_memory.py checks it against real tensors).

What runs is the project's own code: a ``Session`` opened on the pipeline (LoRA, optimizer,
checkpointing, attention as ``Session.open`` sets them), ``core.sampling.sample_trajectory`` for a
pair with CFG plus the VAE decode, and the session's update (``Session._train_step`` under
``Session._use_pipe``, i.e. ``core.update.train_step``) for two clicks, so that the optimizer
states of the first are alive during the second. The official recipe (bench/official.py: a
deep-copied reference UNet, no checkpointing, 32-bit AdamW, classic attention, both images'
graphs alive) runs in the same process, on the same pipeline build.

Fake CUDA tensors abort this CPU-only torch build in backward ("not linked with support for cuda
devices"), so the tensors are fake **CPU** tensors with fp16 weights (the VAE fp32, as
``Session.open`` prepares it). The CPU stands for the accelerator; ``core.update.train_step``
moves the text encoders and VAE to the host during an update (``core.memory.offload_for_update``),
which on a CPU is the same device, so here the same function moves them to the ``meta`` device,
which the tracker does not count. FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``
in the same run; seconds on a GPU are an ESTIMATE from them (``CARD``).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from . import report

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_memory.json"
NATIVE = {"sd1": 512, "sd2": 768, "sdxl": 1024}
LABELS = {"sd1": "SD 1.5", "sd2": "SD 2.1 (v-prediction)", "sdxl": "SDXL"}
PROMPT = "a photograph of an astronaut riding a horse"
STEPS = 20                       # DDIM steps of a sampled pair (Settings.steps)
KEPT = 2                         # kept steps trained per click here; memory is per kept step
SAMPLED_STEPS = 2                # sampling steps run here; memory is per step, FLOPs scale to STEPS
# The GPU whose seconds are estimated from the counted FLOPs.
CARD = {"name": "NVIDIA GeForce RTX 4090", "fp16_dense_tflops": 165.2, "utilisation": 0.35,
        "source": "NVIDIA Ada Lovelace architecture whitepaper: 165.2 TFLOPS fp16 tensor with fp32 "
                  "accumulate, dense (330.4 with sparsity)"}
TAGS = ("UNet", "reference UNet copy", "text encoders + VAE", "LoRA", "LoRA grads", "optimizer states",
        "trajectory", "activations")


@dataclass(frozen=True)
class Variant:
    settings: dict          # Settings fields changed from the defaults
    offload: bool           # text encoders + VAE off the accelerator during the update
    note: str               # what differs from ours, in words
    official: bool = False  # bench/official.py's replica instead of the session's update
    vae_slicing: bool = False  # the VAE decodes one image at a time (diffusers' enable_slicing)
    vae_tiling: bool = False   # ... and in overlapping tiles (diffusers' enable_tiling)
    encoders_off: bool = False  # the text encoders off the accelerator during the VAE decode
    baseline: str = "ours"      # the sampling-only row's saving is against this row's sampling
    decode: bool = True         # False: the sampling's denoising steps only (their own peak)


# Every row measures the update that steps the optimizer: the default step_evidence never steps it,
# so it holds no optimizer states; the optimizer's path is the larger one, and the one whose
# 8-bit Adam the table is about.
OPTIMIZER_PATH = {"step_evidence": False}

VARIANTS = {
    "ours": Variant({}, True, "as shipped (Settings defaults), the optimizer stepping each click"),
    "ours-no-offload": Variant({}, False, "text encoders + VAE stay on the accelerator"),
    "ours-split": Variant({"backward": "split"}, True, "backward='split'"),
    "ours-no-checkpointing": Variant({"gradient_checkpointing": False}, True, "gradient checkpointing off"),
    "ours-vae-slicing": Variant({}, True, "+ VAE decoding one image at a time (vae.enable_slicing())",
                                vae_slicing=True),
    "ours-vae-tiling": Variant({}, True, "+ vae.enable_tiling() on top of slicing (diffusers tiles only latents "
                                         "larger than the VAE's sample size: none at the native size)",
                               vae_slicing=True, vae_tiling=True),
    "ours-encoders-off": Variant({}, True, "+ the text encoders on the host during the VAE decode (Session.sample "
                                           "does it when the estimate says the sampling won't fit)",
                                 vae_slicing=True, encoders_off=True, baseline="ours-vae-slicing"),
    "ours-no-decode": Variant({}, True, "the denoising steps alone, no VAE decode: their own peak",
                              vae_slicing=True, decode=False, baseline="ours-vae-slicing"),
    "ours-adamw32": Variant({"optimizer": "adamw"}, True, "32-bit torch AdamW instead of the automatic choice"),
    "ours-sdpa": Variant({"attention": "sdpa"}, True, "torch SDPA attention (where the automatic choice is xformers)"),
    "ours-conv": Variant({"lora_targets": ("conv1", "conv2")}, True,
                         "the LoRA on the ResNet blocks' convolutions (lora_targets=conv1,conv2)"),
    "official": Variant({}, False, "official recipe: deep-copied reference UNet, no checkpointing, "
                                   "32-bit AdamW, classic attention, both images' graphs alive", official=True),
}
ORDER = ["ours", "official", "ours-split", "ours-no-checkpointing", "ours-no-offload",
         "ours-vae-slicing", "ours-vae-tiling"]            # most needed first
# Rows of the sampling alone (what they change is not used in an update).
SAMPLING_ONLY = ("ours-vae-slicing", "ours-vae-tiling", "ours-encoders-off", "ours-no-decode")
# Rows whose FLOPs are counted too: the update as shipped, and where the LoRA sits changes the compute.
FLOP_ROWS = ("ours", "ours-conv")
PLAN = {"sd1:512": ORDER, "sdxl:1024": ORDER, "sd2:768": ORDER, "sd1:1024": ["ours"]}


# ------------------------------------------------------------------ fake pipelines
def fake_mode():
    """A FakeTensorMode whose outputs can be moved between devices by ``Module.to``.

    The mode memoizes every fake output by a weak reference; ``Module.to`` swaps fake parameters
    with ``torch.utils.swap_tensors``, which refuses tensors with a weak reference. Outputs never
    need that memo (it maps the fresh meta tensor behind each output), so it is switched off.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    return mode


def build_pipeline(family: str, mode=None, device=None):
    """The diffusers pipeline of ``family`` from the shipped configs ("tiny-sd1"/"tiny-sdxl": the
    test pipelines of core/tiny.py), in float32; fake weights when ``mode`` is a FakeTensorMode,
    else random weights (seed 0) made directly on ``device`` (SDXL's UNet would take minutes to
    initialise on a CPU). ``Session.open`` (``prepare_pipeline``) casts it to the session's
    dtype, as for a loaded model."""
    with mode or nullcontext(), torch.device(device) if device else nullcontext(), \
            torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if family.startswith("tiny-"):
            from ..core.tiny import tiny_pipeline
            return tiny_pipeline(family.removeprefix("tiny-"))
        return _configured_pipeline(family)


def _configured_pipeline(family: str):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..core.loading import _PAD_TOKENS, _clip_tokenizer, _config_family, _pipeline_classes, CONFIGS_DIR
    folder = CONFIGS_DIR / family

    def config(path):
        return json.loads((folder / path).read_text())
    parts = {"scheduler": DDIMScheduler.from_config(config("scheduler/scheduler_config.json")),
             "unet": UNet2DConditionModel.from_config(config("unet/config.json")),
             "vae": AutoencoderKL.from_config(config("vae/config.json")),
             "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(config("text_encoder/config.json"))),
             **{name: _clip_tokenizer(pad) for name, pad in _PAD_TOKENS[_config_family(folder)].items()}}
    if (folder / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = CLIPTextModelWithProjection(
            CLIPTextConfig.from_dict(config("text_encoder_2/config.json")))
    cls = _pipeline_classes()[config("model_index.json")["_class_name"]]
    extra = {} if "text_encoder_2" in parts else {"safety_checker": None, "feature_extractor": None,
                                                  "requires_safety_checker": False}
    return cls(**parts, **extra)


def encoders(pipe) -> list[torch.nn.Module]:
    from ..core.memory import OFFLOADED
    return [m for m in (getattr(pipe, n, None) for n in OFFLOADED) if m is not None]


# ------------------------------------------------------------------ counting
class Flops:
    """FLOPs of torch ops (FlopCounterMode), with torch's CPU flash attention counted as SDPA."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
        aten = torch.ops.aten

        def forward(q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(q, k, v)

        def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, q, k, v)
        self.mode = FlopCounterMode(display=False, custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})

    def total(self) -> int:
        return self.mode.get_total_flops()


def gpu_seconds(flops: float) -> float:
    """Seconds on ``CARD`` at its stated utilisation of the fp16 dense peak: an estimate."""
    return flops / (CARD["fp16_dense_tflops"] * 1e12 * CARD["utilisation"])


def _breakdown(at_peak: dict) -> dict:
    out = {tag: int(at_peak.get(tag, 0)) for tag in TAGS if tag != "activations"}
    out["activations"] = int(sum(v for k, v in at_peak.items() if k not in out))
    return out


# ------------------------------------------------------------------ one configuration
def measure(family: str, size: int, name: str, sampling: bool = False, kept: int = KEPT,
            fake: bool = True, dtype: str = "float16", count_flops: bool = True, clicks: int = 2,
            settings: dict | None = None) -> dict:
    """Peak live bytes and FLOPs of ``clicks`` clicks' updates (and optionally the sampling) for
    ``name``, with fake tensors (or real ones, ``fake=False``: the validation on a tiny model).
    ``settings``: Settings fields set on top of the variant's."""
    from ..core.memory import LiveBytes
    from ..core.runtime import adamw8bit_runs_on
    v = VARIANTS[name]
    v = dataclasses.replace(v, settings={**v.settings, **(settings or {})})
    adamw8bit_runs_on("cpu")          # decided on real tensors, before any fake mode (cached)
    mode, live, started = (fake_mode() if fake else nullcontext()), LiveBytes("cpu"), time.perf_counter()
    with live, tempfile.TemporaryDirectory(prefix="d3po-gpu-memory-") as folder:
        pipe = build_pipeline(family, mode if fake else None)
        setup = _official_setup if v.official else _session_setup
        with setup(pipe, mode, live, folder, v, size, kept, dtype, torch.device("cpu")) as run:
            _track_weights(live, pipe, run)
            row = {"variant": name, "family": family, "size": size, "note": v.note, "kept_steps": kept,
                   "fake": fake, "dtype": dtype, "vae_slicing": bool(pipe.vae.use_slicing)}
            if sampling:
                row["sampling"] = _measure_sampling(run, live, count_flops)
            if clicks:
                row.update(_measure_clicks(run, pipe, live, size, count_flops, clicks))
    row["wall_seconds"] = time.perf_counter() - started
    return row


@contextmanager
def _session_setup(pipe, mode, live, folder, v: Variant, size: int, kept: int, dtype: str, device: torch.device):
    """A Session on the pipeline; yields ``run(kind, traj, progress, steps, fraction)``: "sample"
    (``steps`` DDIM steps) or "update" (``fraction`` of the kept steps; default ``kept``/STEPS).

    The text encoders and VAE go off the accelerator during an update as the session does it
    (``core.memory.offload_for_update``): to the host on a GPU; with fake tensors, where the CPU
    stands for the GPU, to the ``meta`` device, which the tracker does not count."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..core import update
    from ..core.memory import offload_for_update
    from ..core.session import Session
    with mode:
        session = Session.open(folder, model="bench", pipeline=pipe, device=str(device), dtype=dtype, height=size,
                               width=size, train_fraction=kept / STEPS, **{**OPTIMIZER_PATH, **v.settings})
    _tag_grads(session.params, live)
    if v.vae_slicing:
        pipe.vae.enable_slicing()
    if v.vae_tiling:
        pipe.vae.enable_tiling()
    fake = isinstance(mode, FakeTensorMode)
    offload = (functools.partial(offload_for_update, host="meta") if fake else update.offload_for_update) \
        if v.offload else _no_offload

    def run(kind, traj=None, progress=None, steps=STEPS, fraction=None):
        s = session.settings if fraction is None else session.settings.replace(train_fraction=fraction)
        with session._use_pipe():
            if kind == "sample":
                with torch.no_grad():
                    return _sample_and_decode(pipe, s.height, s.width, device, steps, progress, v.decode,
                                              encoders_host=("meta" if fake else "cpu") if v.encoders_off else None)
            with mock.patch.object(update, "offload_for_update", offload):
                result = session._train_step(traj, [(0, 1)], s, progress)
            for m in encoders(pipe):            # moved back: new storages, same owner
                live.track_module(m, "text encoders + VAE")
            live.track(_optimizer_tensors(session.optimizer), "optimizer states")
            return result
    run.params, run.notes = session.params, list(session.runtime.notes)
    try:
        yield run
    finally:
        session.close()


@contextmanager
def _no_offload(pipe, device):
    yield pipe


@contextmanager
def _official_setup(pipe, mode, live, folder, v: Variant, size: int, kept: int, dtype: str, device: torch.device):
    """bench/official.py's update: a reference copy of the UNet (made after its LoRA, as there),
    classic attention in both, torch AdamW, the VAE decoding both images at once; yields
    ``run(kind, traj, progress, steps, fraction)`` as ``_session_setup``."""
    from diffusers.models.attention_processor import AttnProcessor

    from ..core.lora import add_lora
    from ..core.runtime import resolve_runtime
    from ..core.sampling import make_scheduler
    from ..core.session import prepare_pipeline
    from ..core.update import apply_gradients, steps_to_train
    from .memory import LORA_TARGETS, _reference_copy
    from .official import OFFICIAL, official_accumulate
    with mode:
        runtime = resolve_runtime(str(device), dtype, "adamw", "sdpa")
        prepare_pipeline(pipe, runtime)
        pipe.vae.disable_slicing()
        params = add_lora(pipe.unet, 4, 4.0, LORA_TARGETS)
        ref = _reference_copy(pipe.unet)
        for unet in (pipe.unet, ref):
            unet.set_attn_processor(AttnProcessor())
        optimizer = torch.optim.AdamW(params, lr=3e-5, weight_decay=1e-4)
    live.track_module(ref, "reference UNet copy")
    _tag_grads(params, live)

    def run(kind, traj=None, progress=None, steps=STEPS, fraction=None):
        if kind == "sample":
            with torch.no_grad():
                return _sample_and_decode(pipe, size, size, device, steps, progress)
        gen = torch.Generator("cpu").manual_seed(0)
        trained = steps_to_train(traj, make_scheduler(pipe, len(traj.timesteps)), 1.0, kept / STEPS if fraction is None
                                 else fraction, gen)
        official_accumulate(pipe, ref, traj, (0, 1), steps=trained, device=device, progress=progress,
                            **{k: OFFICIAL[k] for k in ("beta", "guidance", "eta", "ratio_clip")})
        norm = apply_gradients(params, optimizer, 1.0)
        live.track(_optimizer_tensors(optimizer), "optimizer states")
        return norm
    run.params, run.notes = params, list(runtime.notes)
    yield run


def _track_weights(live, pipe, run) -> None:
    live.track_module(pipe.unet, "UNet")
    live.track(run.params, "LoRA")
    for m in encoders(pipe):
        live.track_module(m, "text encoders + VAE")


def _tag_grads(params, live) -> None:
    def hook(p):
        live.track([p.grad], "LoRA grads")
    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def _sample_and_decode(pipe, height: int, width: int, device: torch.device, steps: int = STEPS, progress=None,
                       decode: bool = True, encoders_host=None):
    """core.sampling.sample_trajectory of a pair with CFG, then the VAE decode of ``decode``
    without its conversion to PIL images (fake tensors have no pixels); ``encoders_host``: where
    the text encoders wait during the decode, as ``Session._room_to_decode`` moves them."""
    from ..core.memory import TEXT_ENCODERS, offloaded
    from ..core.sampling import sample_trajectory
    traj = sample_trajectory(pipe, PROMPT, "", 2, 0, steps=steps, guidance=5.0, eta=1.0, height=height,
                             width=width, device=device, progress=progress)
    vae = pipe.vae
    if not decode:
        return traj
    with offloaded(pipe, device, TEXT_ENCODERS, encoders_host) if encoders_host else nullcontext():
        vae.decode(traj.latents[-1].to(vae.device, vae.dtype) / vae.config.scaling_factor, return_dict=False)
    return traj


def _linear_flops(run_counted, steps: int) -> tuple[float, float]:
    """(fixed, per step) FLOPs of ``run_counted(progress)``, from the counter's total after each step.

    FlopCounterMode is never active while memory is measured: it keeps tensors alive (on SD 1.5 at
    256 px it raised the peak by 1.1 GB)."""
    flops, marks = Flops(), []
    with flops.mode:
        run_counted(lambda i, n: marks.append(flops.total()))
    per_step = marks[-1] / len(marks) if marks else 0.0
    return flops.total() - per_step * len(marks), per_step


def _measure_sampling(run, live, count_flops: bool = True) -> dict:
    """Peak and FLOPs of sampling a pair + decode, run for SAMPLED_STEPS steps: every step holds the
    same memory (no graph; the kept latents go to the host), FLOPs = fixed + STEPS × per step."""
    live.reset_peak()
    with live.tagged("sampling activations"):
        run("sample", steps=SAMPLED_STEPS)
    row = {"peak_bytes": live.peak, "at_peak": _breakdown(live.at_peak)}
    if count_flops:
        fixed, per_step = _linear_flops(lambda progress: run("sample", steps=SAMPLED_STEPS, progress=progress),
                                        SAMPLED_STEPS)
        row.update(flops=fixed + STEPS * per_step, flops_fixed=fixed, flops_per_step=per_step)
    return row


def _measure_clicks(run, pipe, live, size: int, count_flops: bool = True, clicks: int = 2) -> dict:
    """Clicks on a synthetic pair trajectory: FLOPs counted in the first, the peak taken in the
    last (with two, the optimizer states of the first are alive then)."""
    from .synthetic import synthetic_trajectory
    traj = synthetic_trajectory(pipe, size, steps=STEPS, n=2)
    live.track([traj.latents, *traj.cond.values()], "trajectory")
    row = {}
    with live.tagged("update"):
        if count_flops:
            fixed, per_step = _linear_flops(lambda progress: run("update", traj, progress), STEPS)
            row.update(flops_fixed=fixed, flops_per_kept_step=per_step)
        elif clicks > 1:
            run("update", traj)
        live.reset_peak()
        run("update", traj)
    return {**row, "peak_bytes": live.peak, "at_peak": _breakdown(live.at_peak)}


def run_plan(plan: dict[str, list[str]], log=print, on_result=None) -> list[dict]:
    """Each (family:size, variant) in this process, one after the other; sampling with "ours"."""
    results = []
    for key, names in plan.items():
        family, size = key.split(":")
        for name in names:
            row = measure(family, int(size), name, sampling=name in ("ours", *SAMPLING_ONLY),
                          count_flops=name in FLOP_ROWS, clicks=0 if name in SAMPLING_ONLY else 2)
            log(f"{key} {name}: peak {report.gb(row.get('peak_bytes', row.get('sampling', {}).get('peak_bytes', 0)))}"
                f" ({row['wall_seconds']:.0f} s)")
            results.append(row)
            if on_result:
                on_result(results)
    return results


def parse_plan(items: list[str], variants: list[str] | None) -> dict[str, list[str]]:
    from .memory import parse_plan as parse
    families = [*NATIVE, "tiny-sd1", "tiny-sdxl"]
    for item in items:
        family, _, size = item.partition(":")
        if family not in families or not size.isdigit():
            raise SystemExit(f"--plan {item!r}: write family:size with family in {families}, e.g. sd1:512")
    return parse(items, variants, PLAN, VARIANTS)


def main(argv=None) -> None:
    import sys

    from .gpu_memory_device import DEVICE_RESULTS, main_on_device
    from .gpu_memory_report import write_all
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--plan", nargs="+", help="family:size items, e.g. sd1:512 sdxl:1024 (default: all of the "
                                              "mode's plan)")
    p.add_argument("--variants", nargs="+", help=f"subset of {list(VARIANTS)} (default: the plan's)")
    p.add_argument("--doc", default=str(report.DEFAULT_PATH), help="markdown file to write the section into")
    p.add_argument("--results", default=str(RESULTS), help="JSON file for the raw results")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the section from --results (no run; "
                                                          "with --device, from the device's results)")
    p.add_argument("--device", help="real tensors on this device (cuda, cpu) instead of fake ones; then "
                                    "--results defaults to " + DEVICE_RESULTS.name)
    p.add_argument("--section", default="gpu_memory", help="with --device: the section of --doc to write (another "
                                                           "name: a second GPU's rows in a section of their own)")
    p.add_argument("--budget-s", type=float, help="with --device: start no row after this many seconds")
    p.add_argument("--steps", type=int, default=STEPS, help="with --device: DDIM steps of the sampled pair and "
                                                            "of the trained trajectory (fewer: a smoke test)")
    a = p.parse_args(argv)
    command = "python -m d3po_studio.bench.gpu_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.device:
        return main_on_device(a, command.strip())
    if a.rewrite:
        payload = json.loads(Path(a.results).read_text())
        write_all(payload["results"], payload["command"], a.doc, a.results)
        return
    run_plan(parse_plan(a.plan or list(PLAN), a.variants),
             on_result=lambda results: write_all(results, command.strip(), a.doc, a.results))


if __name__ == "__main__":
    main()
