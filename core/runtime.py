"""Runtime choices — device, weight dtype, optimizer, attention — each a small registry.

"auto" picks the leanest option that runs here; every choice and every fallback is logged
once (logger ``d3po_studio``) and kept in ``Runtime.notes`` for ``d3po-studio info``.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from .errors import ConfigError

log = logging.getLogger("d3po_studio")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    device: torch.device     # where the model runs
    dtype: torch.dtype       # dtype of the frozen weights (LoRA weights are always fp32)
    optimizer: str           # "adamw8bit" or "adamw"
    attention: str           # "xformers" or "sdpa"
    notes: tuple[str, ...]   # why each choice was made, in words

    def describe(self) -> dict:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "optimizer": self.optimizer, "attention": self.attention, "notes": list(self.notes)}


@functools.lru_cache(maxsize=None)  # deliberate: each distinct message is logged once per process
def say_once(message: str) -> str:
    log.info(message)
    return message


def resolve_runtime(device: str = "auto", dtype: str = "auto", optimizer: str = "auto",
                    attention: str = "auto") -> Runtime:
    notes = []
    dev = _choose_device(device, notes)
    dt = _choose_dtype(dtype, dev, notes)
    opt = _choose_optimizer(optimizer, dev, notes)
    att = _choose_attention(attention, dev, notes)
    return Runtime(dev, dt, opt, att, tuple(say_once(n) for n in notes))


def _choose_device(name: str, notes: list) -> torch.device:
    if name != "auto":
        try:
            dev = torch.device(name)
        except RuntimeError as e:
            raise ConfigError(f"device={name!r} is not a torch device: use auto, cpu, cuda or mps") from e
        notes.append(f"device: {dev} (asked for)")
        return dev
    if torch.cuda.is_available():
        notes.append("device: cuda (auto: a CUDA GPU is available)")
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        notes.append("device: mps (auto: Apple GPU available)")
        return torch.device("mps")
    notes.append("device: cpu (auto: no CUDA or MPS device found)")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 is faster."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _choose_dtype(name: str, dev: torch.device, notes: list) -> torch.dtype:
    if name != "auto":
        notes.append(f"dtype: {name} (asked for)")
        return DTYPES[name]
    if dev.type in ("cuda", "mps"):
        notes.append(f"dtype: float16 frozen weights, float32 LoRA (auto on {dev.type})")
        return torch.float16
    if cpu_has_bf16():
        notes.append("dtype: bfloat16 frozen weights, float32 LoRA (auto: this CPU has bf16 instructions)")
        return torch.bfloat16
    notes.append("dtype: float32 (auto: this CPU has no bf16 instructions, where bf16 would be slower)")
    return torch.float32


@functools.lru_cache(maxsize=None)
def adamw8bit_runs_on(device_type: str) -> str | None:
    """None if bitsandbytes' AdamW8bit imports and takes a step on this device, else why not."""
    try:
        import bitsandbytes as bnb
        p = torch.nn.Parameter(torch.zeros(4096, device=device_type))
        opt = bnb.optim.AdamW8bit([p], lr=1e-3)
        p.grad = torch.ones_like(p)
        opt.step()
        if not torch.isfinite(p).all():
            return "its step gave non-finite values"
        return None
    except Exception as e:  # noqa: BLE001 - any failure means "does not run here"; we say which
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]


def _choose_optimizer(name: str, dev: torch.device, notes: list) -> str:
    if name == "adamw":
        notes.append("optimizer: torch AdamW (asked for)")
        return "adamw"
    why_not = adamw8bit_runs_on(dev.type)
    if why_not is None:
        notes.append(f"optimizer: bitsandbytes AdamW8bit ({'asked for' if name != 'auto' else 'auto'}; "
                     f"it runs on {dev.type})")
        return "adamw8bit"
    if name == "adamw8bit":
        raise ConfigError(f"optimizer='adamw8bit' does not run on {dev.type} ({why_not}): "
                          "use optimizer='auto' or 'adamw'")
    notes.append(f"optimizer: torch AdamW (fallback: bitsandbytes AdamW8bit does not run on {dev.type}: {why_not})")
    return "adamw"


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer={name!r} is unknown: use one of ['adamw8bit', 'adamw']")


def _choose_attention(name: str, dev: torch.device, notes: list) -> str:
    if name == "sdpa":
        notes.append("attention: torch SDPA (asked for)")
        return "sdpa"
    why_not = _xformers_unavailable(dev)
    if why_not is None:
        notes.append(f"attention: xformers ({'asked for' if name != 'auto' else 'auto: CUDA, and xformers runs here'})")
        return "xformers"
    if name == "xformers":
        raise ConfigError(f"attention='xformers' is not available: {why_not}; use attention='auto' or 'sdpa'")
    notes.append(f"attention: torch SDPA (fallback: {why_not})")
    return "sdpa"


def _xformers_unavailable(dev: torch.device) -> str | None:
    if dev.type != "cuda":
        return f"xformers is CUDA-only and the device is {dev.type}"
    try:
        import xformers.ops  # noqa: F401
    except ImportError as e:
        return f"xformers is not importable ({e}); pip install xformers to use it"
    return _xformers_fails(dev)


def _xformers_fails(dev: torch.device) -> str | None:
    """Why xformers' attention cannot run on ``dev``, or None. An xformers built for another torch
    or CUDA imports but has no kernels (seen on an H100: xformers 0.0.35 built for torch 2.10
    under torch 2.11), and diffusers' switch to it then raises at the first pipeline; so run the
    same small fp32 attention diffusers tries, once, before choosing it."""
    import xformers.ops
    try:
        q = torch.randn((1, 2, 40), device=dev)
        xformers.ops.memory_efficient_attention(q, q, q)
    except Exception as e:  # noqa: BLE001 - any failure means: do not use it
        first = next(iter(str(e).strip().splitlines()), "")
        return (f"xformers {getattr(xformers, '__version__', '')} is installed but its attention does not run here "
                f"({type(e).__name__}: {first}); it was built for another torch or CUDA: install the xformers "
                f"release built for torch {torch.__version__}")
    return None


def apply_attention(pipe, attention: str) -> None:
    """Switch the pipeline's attention backend (SDPA is diffusers' default)."""
    if attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated since the last reset_peak_memory. CPU: the process's peak resident set
    size, since the last reset_peak_memory on Linux, since the process started elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_memory_bytes(device: torch.device) -> int:
    """CUDA: bytes allocated now. CPU: the process's resident set size now (0 where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    rss = _proc_status_kib("VmRSS")
    return rss * 1024 if rss is not None else 0


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak for peak_memory_bytes; False where it cannot (CPU off Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")          # Linux >= 4.0: reset the RSS high-water mark to the current RSS
        return True
    except OSError:
        return False


@contextlib.contextmanager
def measure_memory(device: torch.device):
    """Memory of the block alone, not of what ran before it in the process:

        with measure_memory(device) as memory:
            ...
        memory()  # {"peak_memory_bytes": peak during the block (the process's RSS on a CPU),
                  #  "added_memory_bytes": that peak less what was in use when the block began}

    On a CPU where the peak cannot be reset (not Linux) both figures are None."""
    exact = reset_peak_memory(device)
    start = current_memory_bytes(device)
    result: dict = {}
    try:
        yield lambda: dict(result)
    finally:
        peak = peak_memory_bytes(device) if exact else None
        result.update(peak_memory_bytes=peak, added_memory_bytes=None if peak is None else max(0, peak - start))


def _proc_status_kib(field: str) -> int | None:
    """A "kB" field of /proc/self/status (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None
