"""Opening a session folder: lock it, reconcile the asked-for model and settings with what the
folder holds, and get the (shared) pipeline with a fresh adapter name on it.

    opened = open_folder(folder, model, pipeline, settings)   # Session.open builds on this
"""
from __future__ import annotations

import datetime
import fcntl
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import FIXED_AFTER_FIRST_UPDATE, SAMPLING_FIELDS, Settings
from .errors import ConfigError, SessionError
from .pool import POOL, SharedPipeline
from .runtime import Runtime, apply_attention, resolve_runtime
from .storage import SessionFolder

# Settings a new session on a model family gets unless they are given, and why. An SDXL click's
# update trains 3 of the 20 kept steps: ≈ 8 s on an RTX 4090 by the counted FLOPs instead of
# ≈ 39 s for all 20 (bench/gpu_memory.py; docs/benchmarks.md, section gpu_memory).
FAMILY_DEFAULTS: dict[str, dict] = {"sdxl": {"train_fraction": 0.15}}
FAMILY_REASONS = {"sdxl": "an SDXL update of all 20 kept steps takes about 39 s on an RTX 4090-class GPU by the "
                          "FLOP estimate, 3 of them about 8 s"}


@dataclass
class Opened:
    """What a Session is made from. ``close()`` undoes it if the Session cannot be made."""
    folder: SessionFolder
    lock: object                 # the open .lock file, flock-ed
    shared: SharedPipeline
    adapter: str
    settings: Settings
    runtime: Runtime
    meta: dict
    notes: list[str] = field(default_factory=list)   # settings chosen for the user, in words

    def close(self) -> None:
        POOL.release(self.shared, self.adapter)
        self.lock.close()


def open_folder(folder, model: str | None, pipeline, settings: dict) -> Opened:
    """Lock ``folder``, resolve model and settings against its session.json, acquire the pipeline
    from the pool and write the resolved session.json. Raises (and holds nothing) on failure."""
    from .loading import load_pipeline, model_family, model_fingerprint
    sf = SessionFolder(folder)
    sf.root.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(sf.root)
    try:
        meta = sf.read_meta() if sf.exists() else None
        model = model if model is not None else (meta["model"] if meta else "embedded")
        fingerprint = model_fingerprint(model) if pipeline is None else f"given:{model}"
        if meta is not None:
            _check_same_model(meta, model, fingerprint, sf)
            resolved = _merge_settings(meta, settings, has_updates=_has_updates(sf))
        else:
            resolved = Settings.from_dict({**_model_defaults(model), **settings})
        runtime = resolve_runtime(resolved.device, resolved.dtype, resolved.optimizer, resolved.attention)

        def load():
            pipe = pipeline if pipeline is not None else load_pipeline(
                model, torch_dtype=runtime.dtype, device=str(runtime.device))
            return prepare_pipeline(pipe, runtime)
        key = ("given", id(pipeline)) if pipeline is not None else \
            ("model", fingerprint, str(runtime.device), str(runtime.dtype), runtime.attention)
        shared, adapter = POOL.acquire(key, load, (str(runtime.device), str(runtime.dtype)))
    except BaseException:
        lock.close()
        raise
    opened = Opened(sf, lock, shared, adapter, resolved, runtime, meta)
    try:
        family = model_family(shared.pipe)
        resolved = _fill_native_size(resolved, shared.pipe)
        if meta is None:                      # a resumed session keeps the settings it was made with
            resolved, opened.notes = _family_defaults(resolved, family, settings)
        opened.settings = resolved
        opened.meta = {**(meta or {"created": _now()}), "model": model, "model_fingerprint": fingerprint,
                       "family": family, "settings": resolved.to_dict()}
        sf.write_meta(opened.meta)
    except BaseException:
        opened.close()
        raise
    return opened


def _lock_folder(root: Path):
    f = open(root / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise SessionError(f"session {root} is open in another process or tab; close it there first")
    return f


def _check_same_model(meta: dict, model: str, fingerprint: str, sf: SessionFolder) -> None:
    if meta["model_fingerprint"] != fingerprint:
        raise SessionError(f"session {sf.root} was made with model {meta['model']!r}; "
                           f"open it with that model, or use a new folder for {model!r}")


def _has_updates(sf: SessionFolder) -> bool:
    """Whether the folder's LoRA has been trained (a damaged HEAD counts as yes)."""
    name, problem = sf.head_state()
    return name is not None or problem is not None


def _merge_settings(meta: dict, given: dict, has_updates: bool) -> Settings:
    stored = Settings.stored(meta["settings"])
    if has_updates:
        changed = [k for k in FIXED_AFTER_FIRST_UPDATE if k in given and
                   Settings.from_dict({**stored.to_dict(), k: given[k]}).to_dict()[k] != stored.to_dict()[k]]
        if changed:
            raise ConfigError(f"settings {changed} are fixed after the first update of this session; "
                              "start a new session to change them")
    return stored.replace(**given)


def prepare_pipeline(pipe, runtime: Runtime):
    """Move to the device, cast frozen weights to the runtime dtype, set attention."""
    pipe.to(runtime.device)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None and module.dtype != runtime.dtype:
            module.to(dtype=runtime.dtype)
    if pipe.vae.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)  # decode in fp32: SDXL's VAE overflows in fp16
    pipe.vae.enable_slicing()   # decode one image at a time: the click's memory peak (docs/benchmarks.md)
    pipe.set_progress_bar_config(disable=True)
    apply_attention(pipe, runtime.attention)
    return pipe


def _model_defaults(model: str) -> dict:
    """The embedded model brings its own sampling defaults (steps, guidance, size)."""
    if model != "embedded":
        return {}
    from .embedded import DEFAULTS
    return {k: v for k, v in DEFAULTS.items() if k in SAMPLING_FIELDS}


def _family_defaults(s: Settings, family: str, given: dict) -> tuple[Settings, list[str]]:
    """``s`` with ``FAMILY_DEFAULTS[family]`` for the fields not in ``given``, and a note for each."""
    chosen = {k: v for k, v in FAMILY_DEFAULTS.get(family, {}).items() if k not in given}
    if not chosen:
        return s, []
    s = s.replace(**chosen)
    notes = [f"{k}={v}, the default for {family}: {FAMILY_REASONS[family]}. Open the session with {k}=... "
             "to choose another" for k, v in chosen.items()]
    return s, notes


def _fill_native_size(s: Settings, pipe) -> Settings:
    if s.height is not None and s.width is not None:
        return s
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return s.replace(height=s.height or size, width=s.width or size)



def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")
