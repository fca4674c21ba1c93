"""GPU memory and time of one click at native resolution: fake tensors on a CPU, or real ones on a GPU.

    OMP_NUM_THREADS=1 nice -n 10 python -m d3po_studio.bench.gpu_memory   # hours on 2 loaded cores
    python -m d3po_studio.bench.gpu_memory --plan sd1:256 --variants ours --doc /tmp/b.md  # smoke
    python -m d3po_studio.bench.gpu_memory --device cuda --budget-s 200   # ≈ 200 s on an H200
    python -m d3po_studio.bench.gpu_memory --device cpu --plan tiny-sd1:16 --steps 4 --doc /tmp/b.md  # its smoke

With ``--device``, the same rows run with real random weights built on the device
(``measure_on_device``): ``torch.cuda.max_memory_allocated`` beside ``LiveBytes`` and the fake
figures, and wall-clock seconds of a sampled pair and of an update (DEVICE_PLAN, most needed first).

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
import copy
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


VARIANTS = {
    "ours": Variant({}, True, "as shipped (Settings defaults)"),
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
    "official": Variant({}, False, "official recipe: deep-copied reference UNet, no checkpointing, "
                                   "32-bit AdamW, classic attention, both images' graphs alive", official=True),
}
ORDER = ["ours", "official", "ours-split", "ours-no-checkpointing", "ours-no-offload",
         "ours-vae-slicing", "ours-vae-tiling"]            # most needed first
# Rows of the sampling alone (what they change is not used in an update).
SAMPLING_ONLY = ("ours-vae-slicing", "ours-vae-tiling", "ours-encoders-off", "ours-no-decode")
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
                               width=size, train_fraction=kept / STEPS, **v.settings)
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


# ------------------------------------------------------------------ real tensors on a device
DEVICE_RESULTS = RESULTS.with_name("gpu_memory_device.json")
DEVICE_VARIANTS = ["ours", "official", "ours-split", "ours-no-checkpointing", "ours-adamw32"]
WITH_SAMPLING = ("ours", "official")           # rows whose sampling is measured and timed too
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


def _gb_or_dash(n_bytes) -> str:
    return "—" if n_bytes is None else report.gb(n_bytes)


def device_markdown(results: list[dict], command: str, environment: dict) -> str:
    """Memory and seconds measured on the device, beside the fake-tensor figures of RESULTS."""
    fake = {}
    if RESULTS.exists():
        fake = {(r["family"], r["size"], r["variant"]): r for r in json.loads(RESULTS.read_text())["results"]}
    out = [f"## GPU memory and time of a click, measured on {environment['gpu']}\n",
           f"{environment['gpu']}, torch {environment['torch']}, {environment['packages']}. "
           f"Date: {environment['date']}. Command: `{command}`.\n", DEVICE_INTRO]
    notes = next((r["runtime_notes"] for r in results if r.get("variant") == "ours" and "runtime_notes" in r), [])
    if notes:
        out.append("The session's automatic choices there: " + "; ".join(notes) + ".\n")
    out += _device_memory_table(results, fake) + _device_time_table(results)
    errors = [f"- {_model(r)}, {r['variant']}: "
              + (f"`{r['error']}`" if "error" in r else
                 f"{len(r['failed_clicks'])} click(s) not stepped (`{r['failed_clicks'][0]}`)")
              for r in results if "error" in r or r.get("failed_clicks")]
    return "\n".join(out + (["Rows that failed, or clicks whose loss or step was not finite:\n", *errors, ""]
                            if errors else []))


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


def _model(r: dict) -> str:
    return f"{LABELS.get(r['family'], r['family'])} at {r['size']} px"


def _official_of(r: dict, results: list[dict]) -> dict | None:
    return next((o for o in results if "error" not in o and o["variant"] == "official"
                 and (o["family"], o["size"]) == (r["family"], r["size"])), None)


def _peaks(part: dict, official: dict | None, fake: dict) -> list[str]:
    """CUDA peak, live bytes, fake live bytes, fake ÷ CUDA, CUDA ÷ official's CUDA."""
    cuda, fake_peak = part["device_peak_bytes"], fake.get("peak_bytes")
    of = (official or {}).get("device_peak_bytes")
    return [f"**{_gb_or_dash(cuda)}**", report.gb(part["peak_bytes"]), _gb_or_dash(fake_peak),
            f"{fake_peak / cuda:.2f}" if cuda and fake_peak else "—", f"{cuda / of:.2f}×" if cuda and of else "—"]


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


def write_device(results: list[dict], command: str, environment: dict, doc, results_path) -> None:
    """The device run's JSON, and the "gpu_memory" section of ``doc``: the device's tables, then
    the fake-tensor ones of RESULTS."""
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "environment": environment, "card": CARD, "results": results}
    Path(results_path).write_text(json.dumps(payload, indent=1))
    text = device_markdown(results, command, environment)
    if RESULTS.exists():
        fake = json.loads(RESULTS.read_text())
        text += "\n" + markdown(fake["results"], fake["command"])
    report.write_section("gpu_memory", text, doc)


# ------------------------------------------------------------------ the report
def update_flops(row: dict, kept_steps: int) -> float:
    """FLOPs of a whole update that trains ``kept_steps`` kept steps (measured per kept step)."""
    return row["flops_fixed"] + kept_steps * row["flops_per_kept_step"]


def max_kept_steps(row: dict, seconds: float) -> int:
    """The most kept steps whose update stays within ``seconds`` on ``CARD`` (estimate)."""
    budget = seconds * CARD["fp16_dense_tflops"] * 1e12 * CARD["utilisation"] - row["flops_fixed"]
    return max(0, int(budget // row["flops_per_kept_step"]))


def measured_constants(results: list[dict]) -> dict:
    """``core.memory.MEASURED`` from the rows measured at each family's native size: the update of
    "ours", its sampling as shipped (the VAE decoding one image at a time; rows measured before
    ``Session.open`` did it give way to ours-vae-slicing), and the text encoders' bytes, which
    ours-encoders-off moves off for the decode."""
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
    return out


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


def run_plan(plan: dict[str, list[str]], log=print, on_result=None) -> list[dict]:
    """Each (family:size, variant) in this process, one after the other; sampling with "ours"."""
    results = []
    for key, names in plan.items():
        family, size = key.split(":")
        for name in names:
            row = measure(family, int(size), name, sampling=name in ("ours", *SAMPLING_ONLY),
                          count_flops=(name == "ours"), clicks=0 if name in SAMPLING_ONLY else 2)
            log(f"{key} {name}: peak {report.gb(row.get('peak_bytes', row.get('sampling', {}).get('peak_bytes', 0)))}"
                f" ({row['wall_seconds']:.0f} s)")
            results.append(row)
            if on_result:
                on_result(results)
    return results


def markdown(results: list[dict], command: str) -> str:
    """The "gpu_memory" section: per model, the variants side by side, then FLOPs and seconds."""
    out = [f"## GPU memory of a click, measured with fake tensors\n\nMachine: {report.machine()}. "
           f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`.\n", INTRO]
    for key in dict.fromkeys(f"{r['family']}:{r['size']}" for r in results):
        rows = [r for r in results if f"{r['family']}:{r['size']}" == key]
        out += _memory_table(rows)
    out += _estimate_check(results)
    out += _time_table([r for r in results if r["variant"] == "ours" and "flops_fixed" in r])
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
            "native size by the pixel count, an update's only upward (they do not shrink in proportion):\n",
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
        table.append([_model(r),
                      f"{smp.get('flops', 0) / 1e12:.1f}", f"{gpu_seconds(smp.get('flops', 0)):.1f}",
                      f"{r['flops_per_kept_step'] / 1e12:.2f}", f"{full / 1e12:.1f}", f"{gpu_seconds(full):.1f}",
                      str(min(k, STEPS)), f"{min(1.0, k / STEPS):.2f}"])
    return out + [report.table(head, table), ""]


def write_all(results: list[dict], command: str, doc, results_path) -> None:
    Path(results_path).parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": command, "card": CARD, "results": results}
    Path(results_path).write_text(json.dumps(payload, indent=1))
    report.write_section("gpu_memory", markdown(results, command), doc)


def parse_plan(items: list[str], variants: list[str] | None) -> dict[str, list[str]]:
    from .memory import parse_plan as parse
    families = [*NATIVE, "tiny-sd1", "tiny-sdxl"]
    for item in items:
        family, _, size = item.partition(":")
        if family not in families or not size.isdigit():
            raise SystemExit(f"--plan {item!r}: write family:size with family in {families}, e.g. sd1:512")
    return parse(items, variants, PLAN, VARIANTS)


def parse_device_plan(items: list[str] | None, variants: list[str] | None) -> list[tuple[str, str]]:
    """DEVICE_PLAN, or each ``--plan`` item with ``variants`` (default DEVICE_VARIANTS)."""
    if not items:
        return [(key, name) for key, name in DEVICE_PLAN if not variants or name in variants]
    plan = parse_plan(items, variants or DEVICE_VARIANTS)
    return [(key, name) for key, names in plan.items() for name in names]


def main(argv=None) -> None:
    import sys
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
    p.add_argument("--budget-s", type=float, help="with --device: start no row after this many seconds")
    p.add_argument("--steps", type=int, default=STEPS, help="with --device: DDIM steps of the sampled pair and "
                                                            "of the trained trajectory (fewer: a smoke test)")
    a = p.parse_args(argv)
    command = "python -m d3po_studio.bench.gpu_memory " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.device:
        return _main_on_device(a, command.strip())
    if a.rewrite:
        payload = json.loads(Path(a.results).read_text())
        write_all(payload["results"], payload["command"], a.doc, a.results)
        return
    run_plan(parse_plan(a.plan or list(PLAN), a.variants),
             on_result=lambda results: write_all(results, command.strip(), a.doc, a.results))


def _main_on_device(a, command: str) -> None:
    import logging
    started = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")  # the auto choices
    results_path = DEVICE_RESULTS if a.results == str(RESULTS) else Path(a.results)
    if a.rewrite:
        payload = json.loads(results_path.read_text())
        write_device(payload["results"], payload["command"], payload["environment"], a.doc, results_path)
        return
    environment = device_environment(a.device)
    print(f"{environment['gpu']}, torch {environment['torch']}, {environment['packages']}", flush=True)
    run_on_device(parse_device_plan(a.plan, a.variants), a.device, a.budget_s, started=started, steps=a.steps,
                  log=lambda line: print(line, flush=True),
                  on_result=lambda results: write_device(results, command, environment, a.doc, results_path))


if __name__ == "__main__":
    main()
