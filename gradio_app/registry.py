"""The app's one piece of module-level state: the open sessions, keyed by folder.

This is the deliberate, documented session registry (STYLE.md point 10). Each browser tab
(one Gradio ``session_hash``) owns at most one open ``Session``; the tab keeps only the folder
in its ``gr.State``. A folder is open at most once: another tab asking for it gets a
``SessionError`` saying where it is open (the core's folder lock would refuse it anyway, so two
tabs can never mix clicks). Closing or reloading a tab closes its session.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import SessionError


@dataclass
class _Entry:
    session: object          # d3po_studio.core.session.Session
    owner: str               # Gradio session_hash of the tab that opened it


class SessionRegistry:
    """Open sessions by resolved folder, each owned by one tab. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[Path, _Entry] = {}

    def open(self, folder, owner: str, opener):
        """Open ``folder`` for tab ``owner`` with ``opener(folder) -> Session``.

        The tab's previous session (if another folder) is closed first. Opening a folder
        this tab already holds returns that session.
        """
        folder = Path(folder).resolve()
        with self._lock:
            entry = self._open.get(folder)
            if entry is not None and entry.owner != owner:
                raise SessionError(f"session {folder.name!r} is open in another browser tab; "
                                   "close it there, or open another session here")
            if entry is not None:
                return entry.session
            self._close_owner_locked(owner)
            session = opener(folder)          # raises SessionError if another process holds it
            self._open[folder] = _Entry(session, owner)
            return session

    def reopen(self, folder, owner: str, opener, restore):
        """Close ``folder`` (held by ``owner``) and open it with ``opener``, e.g. with new
        settings. If that fails, ``restore(folder)`` opens it as it was and the error is raised.
        """
        folder = Path(folder).resolve()
        with self._lock:
            self.get(folder, owner).close()
            del self._open[folder]
            try:
                session = opener(folder)
            except BaseException:
                self._open[folder] = _Entry(restore(folder), owner)
                raise
            self._open[folder] = _Entry(session, owner)
            return session

    def get(self, folder, owner: str):
        """The session at ``folder`` if tab ``owner`` holds it, else a SessionError."""
        folder = Path(folder).resolve() if folder else None
        entry = self._open.get(folder) if folder else None
        if entry is None or entry.owner != owner:
            raise SessionError("no session is open in this tab: create one or resume one under Sessions")
        return entry.session

    def close_owner(self, owner: str) -> None:
        """Close the session tab ``owner`` holds (when the tab closes)."""
        with self._lock:
            self._close_owner_locked(owner)

    def close_all(self) -> None:
        with self._lock:
            for entry in self._open.values():
                entry.session.close()
            self._open.clear()

    def is_open(self, folder) -> bool:
        return Path(folder).resolve() in self._open

    def _close_owner_locked(self, owner: str) -> None:
        for folder, entry in list(self._open.items()):
            if entry.owner == owner:
                entry.session.close()
                del self._open[folder]


# The registry of this process (one per server; tests may build their own).
REGISTRY = SessionRegistry()
