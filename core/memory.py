"""Accelerator memory of an update: measured live bytes, an estimate per model, a fit warning,
and moving the text encoders and VAE off the accelerator while the UNet trains.

    from d3po_studio.core.memory import LiveBytes, fit_warning, offload_for_update

    with LiveBytes("cuda") as live:          # counts tensor storages on that device type
        ...                                   # works with real and with fake tensors
    live.peak, live.at_peak                   # bytes, and bytes per tag at that moment

    fit_warning("sdxl", 1024, 1024, free_bytes=8e9)   # None, or what to change so it fits

``LiveBytes`` is a ``TorchDispatchMode``: every tensor an operator returns whose storage it has
not seen adds the storage's ``nbytes``; a weak reference to the storage subtracts it when
the storage is freed. Its peak is what a GPU allocator must hold, less fragmentation. Under
``FakeTensorMode`` (tensors with shapes and no data) a full-size model runs in seconds on a CPU
and gives the same peak as real tensors (tests/test_gpu_memory.py checks it on a tiny model).
A ``.item()`` of a fake tensor has no value: inside ``LiveBytes`` it returns 1 (True for bools),
so code that reads a loss or a norm runs on; memory and FLOPs do not depend on those values.
"""
from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_ITEM = torch.ops.aten._local_scalar_dense.default


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes on one device type, their peak, and the bytes per tag at the peak."""

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, list] = {}      # storage key -> [nbytes, tag]
        self._refs: dict[int, weakref.ref] = {}  # storage key -> weak reference that frees it
        self.by_tag: Counter = Counter()     # live bytes per tag now
        self.total = 0                       # live bytes now
        self.peak = 0                        # highest total seen (since the last reset_peak)
        self.at_peak: dict[str, int] = {}    # by_tag at that moment
        self.tag = "other"                   # tag given to storages first seen from now on

    # -- counting ------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _ITEM and _is_fake(args[0]):
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, self.tag)
        return out

    def _add(self, t: torch.Tensor, tag: str) -> None:
        if t.device.type != self.device_type:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        nbytes = storage.nbytes()
        self.live[key] = [nbytes, tag]
        self.by_tag[tag] += nbytes
        self.total += nbytes
        self._refs[key] = weakref.ref(storage, lambda _, key=key: self._free(key))
        if self.total > self.peak:
            self.peak = self.total
            self.at_peak = {k: v for k, v in self.by_tag.items() if v}

    def _free(self, key: int) -> None:
        self._refs.pop(key, None)
        entry = self.live.pop(key, None)
        if entry is not None:
            self.total -= entry[0]
            self.by_tag[entry[1]] -= entry[0]

    # -- tagging -------------------------------------------------------------
    def track(self, tensors, tag: str) -> int:
        """Count tensors made before (or outside) this mode under ``tag``, or move the ones
        already counted to ``tag``. Returns the bytes now under ``tag`` from these tensors."""
        seen, moved = set(), 0
        for t in tensors:
            if t is None or t.device.type != self.device_type:
                continue
            key = t.untyped_storage()._cdata
            if key in seen:
                continue
            seen.add(key)
            if key not in self.live:
                self._add(t, tag)
            entry = self.live[key]
            self.by_tag[entry[1]] -= entry[0]
            self.by_tag[tag] += entry[0]
            entry[1] = tag
            moved += entry[0]
        return moved

    def track_module(self, module: torch.nn.Module, tag: str) -> int:
        return self.track(list(module.parameters()) + list(module.buffers()), tag)

    @contextmanager
    def tagged(self, tag: str):
        """Storages first seen inside the block get ``tag``."""
        old, self.tag = self.tag, tag
        try:
            yield self
        finally:
            self.tag = old

    def reset_peak(self) -> None:
        self.peak = self.total
        self.at_peak = {k: v for k, v in self.by_tag.items() if v}


# ----------------------------------------------------------------- offloading

OFFLOADED = ("text_encoder", "text_encoder_2", "vae")   # what an update does not use
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")       # what the VAE decode does not use


@contextmanager
def offload_for_update(pipe, device, host="cpu"):
    """Move the text encoders and the VAE to ``host`` for the block, and back afterwards.

    An update needs only the UNet: the conditioning is stored with the trajectory. Nothing
    moves when ``device`` is ``host`` (a CPU session). Always moves back, even on an error.
    """
    with offloaded(pipe, device, OFFLOADED, host):
        yield pipe


@contextmanager
def offloaded(pipe, device, names, host="cpu"):
    """Move the pipeline's modules ``names`` (those it has) to ``host`` for the block, and back to
    ``device`` afterwards, even on an error; nothing moves when both are the same device type."""
    device, host = torch.device(device), torch.device(host)
    if device.type == host.type:
        yield pipe
        return
    modules = [m for m in (getattr(pipe, name, None) for name in names) if m is not None]
    for m in modules:
        m.to(host)
    try:
        yield pipe
    finally:
        for m in modules:
            m.to(device)


# ----------------------------------------------------------------- estimate and fit warning

# Peak live bytes measured by bench/gpu_memory.py (docs/benchmarks.md, section gpu_memory) at each
# family's native size, fp16 weights, a pair with CFG, Settings defaults otherwise:
#   weights   UNet + LoRA + its gradients and optimizer states, always on the accelerator
#   encoders  text encoder(s) + VAE (fp32): on the accelerator while sampling, off it in an update
#   update    activations at the update's peak, by (gradient_checkpointing, backward)
#   sampling  activations at the sampling peak, the VAE decode (one image at a time, as shipped)
#   denoise   activations of the denoising steps alone (no graph), a pair with CFG
#   text_encoders  the text encoders' bytes, moved to the host for the decode when it won't fit
# and what torch's CUDA allocator held beyond the live tensors of a real run on an NVIDIA H200
# (torch.cuda.max_memory_allocated − LiveBytes' peak; bench/results/gpu_memory_h200.json):
#   cuda_update  the largest gap of an update row (0.10–0.24 GB)
#   cuda_decode  the gap of the sampling, whose peak is the VAE decode of one image (SD 1.5 0.59 GB,
#                SDXL 2.08 GB: ≈ 2,000 bytes per decoded pixel, outside any tensor; docs/benchmarks.md)
MEASURED: dict[str, dict] = {
    "sd1": {"size": 512, "weights": 1729231880, "encoders": 580737028, "text_encoders": 246121576,
             "sampling": 812292880, "denoise": 277164832,
             "update": {(True, "joint"): 1037402076, (True, "split"): 859592044, (False, "joint"): 4262806668},
             "cuda_update": 118781900, "cuda_decode": 589649012},
    "sdxl": {"size": 1024, "weights": 5172086536, "encoders": 1970057324, "text_encoders": 1635441872,
             "sampling": 3259263564, "denoise": 688151548,
             "update": {(True, "joint"): 2688235184, (True, "split"): 2688235184, (False, "joint"): 31426204056},
             "cuda_update": 240374392, "cuda_decode": 2081855372},
    # SD 2.1: no denoise-alone nor encoders-off row: the whole sampling scales with n and no text
    # encoder move is counted, which errs on the safe side
    "sd2": {"size": 768, "weights": 1741753352, "encoders": 1015391748, "sampling": 1823559440,
            "update": {(True, "joint"): 1957805020, (True, "split"): 1638268780, (False, "joint"): 9168814988},
            "cuda_update": 105679660, "cuda_decode": 1150424180},
}


def estimate_bytes(family: str, height: int, width: int, *, n: int = 2, backward: str = "joint",
                   gradient_checkpointing: bool = True, measured: dict | None = None) -> dict[str, float]:
    """Estimated peak bytes on the accelerator of sampling ``n`` images and of one update.

    Sampling activations scale with the pixel count from the measured native size (SDPA keeps no
    tokens² matrix; measured linear between 256 and 512 px on SD 1.5): the denoising steps' also
    with ``n``, the VAE decode's not (one image at a time). An update's do not shrink in
    proportion below the native size (SD 1.5: 0.66 GB at 256 px, 1.04 GB at 512 px), so they
    scale only up, which overestimates: a warning errs on the safe side. A joint update holds
    all ``n`` images' graphs, a split one one image's. The CUDA allocator's measured excess over
    the live tensors ("cuda_update", "cuda_decode"; 0 when absent) is added to the activations and
    scales with them; the denoising steps get the update's (the same UNet; not measured alone).
    Returns ``{"sampling", "sampling_encoders_off", "update", "click"}``: sampling with the text
    encoders on the accelerator throughout, or on the host during the decode (as ``Session.sample``
    does when the first would not fit); click = what a click needs, the larger of the latter and
    the update. ``measured``: figures to use instead of ``MEASURED`` (same layout; without
    "denoise", the whole sampling scales with ``n``).
    """
    measured = MEASURED if measured is None else measured
    m = measured.get(family)
    if m is None:
        raise ValueError(f"family={family!r} has no measurement: use one of {sorted(measured)}")
    scale = height * width / m["size"] ** 2
    key = (gradient_checkpointing, backward)
    update = m["update"].get(key, m["update"][(gradient_checkpointing, "joint")]) + m.get("cuda_update", 0)
    graphs = n / 2 if backward == "joint" else 1.0      # measured on one pair
    decode = (m["sampling"] + m.get("cuda_decode", 0)) * scale
    if "denoise" in m:
        denoise = (m["denoise"] * n / 2 + m.get("cuda_update", 0)) * scale
    else:
        denoise = decode = decode * n / 2
    on = m["weights"] + m["encoders"]
    out = {"sampling": on + max(denoise, decode),
           "sampling_encoders_off": on + max(denoise, decode - m.get("text_encoders", 0)),
           "update": m["weights"] + update * max(scale, 1.0) * graphs}
    out["click"] = max(out["sampling_encoders_off"], out["update"])
    return out


def fit_warning(family: str, height: int, width: int, free_bytes: float | None, *, n: int = 2,
                backward: str = "joint", gradient_checkpointing: bool = True) -> str | None:
    """None when a click (sampling + update) is estimated to fit in ``free_bytes``; else what
    it needs and the setting that makes it fit. ``free_bytes`` None (not a GPU): None."""
    if free_bytes is None or family not in MEASURED:
        return None
    need = estimate_bytes(family, height, width, n=n, backward=backward,
                          gradient_checkpointing=gradient_checkpointing)["click"]
    if need <= free_bytes:
        return None
    head = (f"A click on {family} at {width}×{height} px with {n} images needs about {need / 1e9:.1f} GB "
            f"of GPU memory (estimate) and {free_bytes / 1e9:.1f} GB are free: ")
    for change, label in _fixes(backward, gradient_checkpointing):
        est = estimate_bytes(family, height, width, n=n, **change)["click"]
        if est <= free_bytes:
            return head + f"set {label} (about {est / 1e9:.1f} GB)."
    size = _largest_size(family, height, width, free_bytes, n)
    if size:
        return head + f"set backward='split' and gradient_checkpointing=True, and use {size[1]}×{size[0]} px."
    return head + "even 256 px does not fit; free GPU memory (close other programs) or use a larger GPU."


def _fixes(backward: str, gradient_checkpointing: bool):
    if not gradient_checkpointing:
        yield {"backward": backward, "gradient_checkpointing": True}, "gradient_checkpointing=True"
    if backward != "split":
        yield {"backward": "split", "gradient_checkpointing": gradient_checkpointing}, "backward='split'"
        yield {"backward": "split", "gradient_checkpointing": True}, \
            "backward='split' and gradient_checkpointing=True"


def _largest_size(family: str, height: int, width: int, free_bytes: float, n: int):
    """The largest (height, width) of the same aspect, multiples of 64, ≥ 256 px, that fits."""
    for step in range(max(height, width) // 64, 3, -1):
        h, w = (step * 64, round(step * 64 * width / height / 64) * 64) if height >= width else \
               (round(step * 64 * height / width / 64) * 64, step * 64)
        if min(h, w) >= 256 and estimate_bytes(family, h, w, n=n, backward="split")["click"] <= free_bytes:
            return h, w
    return None


def device_free_bytes(device) -> float | None:
    """Bytes this process could use on ``device``: free + what torch already reserved (CUDA);
    None elsewhere (no warning on a CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device))
