"""One loaded pipeline per model per process, shared by every session on that model.

    shared, adapter = POOL.acquire(key, load)      # load() runs only if no session holds `key`
    with shared.lock:                              # whoever holds it switches the active LoRA
        activate(shared.pipe.unet, adapter, params)
        ...
    POOL.release(shared, adapter)                  # the last release drops the pipeline

Each session is its own named peft adapter on the shared UNet (``d3po``, ``d3po_2``, …; the
lowest free name, so a UNet with one session carries the adapter ``d3po``). N sessions on one
model cost one model plus N LoRAs. ``POOL`` is the deliberate, documented module-level state
of this module (STYLE.md point 10): a process has one set of loaded models.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .errors import SessionError
from .lora import ADAPTER, remove_lora


@dataclass(eq=False)
class SharedPipeline:
    """A loaded pipeline and the sessions (adapters) on it."""
    key: tuple
    pipe: object
    runtime: tuple                       # (device, dtype) the pipeline was prepared for
    lock: threading.RLock = field(default_factory=threading.RLock)   # held while the pipe is used
    adapters: set = field(default_factory=set)


class ModelPool:
    """Loaded pipelines by key; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._shared: dict[tuple, SharedPipeline] = {}

    def acquire(self, key: tuple, load, runtime: tuple = ()) -> tuple[SharedPipeline, str]:
        """The pipeline for ``key`` (``load()`` makes it if none is held) and a fresh adapter name.

        ``runtime``: the (device, dtype) the caller needs; a held pipeline prepared for another
        one is refused (its weights would be cast under the other sessions).
        """
        with self._lock:
            shared = self._shared.get(key)
            if shared is None:
                shared = SharedPipeline(key, load(), runtime)
                self._shared[key] = shared
            elif shared.runtime != runtime:
                raise SessionError(f"this pipeline is in use by another session with device/dtype "
                                   f"{shared.runtime}, not {runtime}; close that session first, or open "
                                   "this one with the same dtype")
            name = _free_name(shared.adapters)
            shared.adapters.add(name)
            return shared, name

    def release(self, shared: SharedPipeline, adapter: str) -> None:
        """Remove ``adapter`` from the shared UNet; drop the pipeline when no session is left."""
        with shared.lock:
            remove_lora(shared.pipe.unet, adapter)
        with self._lock:
            shared.adapters.discard(adapter)
            if not shared.adapters and self._shared.get(shared.key) is shared:
                del self._shared[shared.key]

    def loaded(self) -> dict[tuple, int]:
        """Held pipelines and how many sessions use each."""
        with self._lock:
            return {k: len(s.adapters) for k, s in self._shared.items()}


def _free_name(taken: set) -> str:
    k = 1
    while (name := ADAPTER if k == 1 else f"{ADAPTER}_{k}") in taken:
        k += 1
    return name


# The pool of this process (tests may build their own).
POOL = ModelPool()
