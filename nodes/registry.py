"""Open sessions of this process, and the values that travel between the nodes.

A Session holds an exclusive lock on its folder, and ComfyUI re-runs the Load node whenever
its inputs change, so the node must not open the same folder twice. This module-level
registry (the one deliberate piece of mutable state in the nodes) maps a session folder to
the Session opened on it: the same folder with the same model and settings gives back the
same object across queue runs; changed settings close it and reopen the folder, which resumes
from disk (LoRA, optimizer, rounds).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:     # importing core.session loads diffusers and peft: only when a node first runs
    from ..core.session import Session

_open: dict[Path, tuple[tuple, "Session"]] = {}
_lock = threading.Lock()


def open_session(folder, model: str, pipeline=None, **settings) -> "Session":
    """The session in ``folder``, reusing the open one when model and settings are the same."""
    from ..core.session import Session
    folder = Path(folder).resolve()
    key = (str(model), id(pipeline) if pipeline is not None else None, tuple(sorted(settings.items())))
    with _lock:
        known = _open.get(folder)
        if known is not None and known[0] == key:
            return known[1]
        if known is not None:
            known[1].close()
            del _open[folder]
        session = Session.open(folder, model=model, pipeline=pipeline, **settings)
        _open[folder] = (key, session)
        return session


def close_all() -> None:
    """Close every session opened here (releases the folder locks)."""
    with _lock:
        for _, session in _open.values():
            session.close()
        _open.clear()


@dataclass(frozen=True)
class Round:
    """D3PO_ROUND: one sampled batch of a session, waiting for a pick."""
    session: Session
    batch_id: str
    n: int


@dataclass(frozen=True)
class Pick:
    """D3PO_PICK: the user's answer for a round (``index`` picked, or ``none`` is better)."""
    round: Round
    index: int | None
    none: bool = False
