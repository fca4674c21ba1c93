"""The app's one piece of module-level state: the open sessions, keyed by folder.

This is the deliberate, documented session registry (STYLE.md point 10). Each browser tab
(one Gradio ``session_hash``) owns at most one open ``Session``; the tab keeps only the folder
in its ``gr.State``. A folder is open at most once: another tab asking for it gets a
``SessionError`` saying where it is open (the core's folder lock would refuse it anyway, so two
tabs can never mix clicks). Closing or reloading a tab closes its session.

Lifecycle, all through ``Session.close`` (which finishes the session's queued updates first):
- a folder being closed (tab closed, settings applied) is not reopened until the close is
  complete: ``open``/``get`` wait for it instead of failing or racing the update;
- a session nobody used for ``idle_timeout_s`` (default 15 min) and with no update queued or
  running is closed by a background sweep, so sessions opened by stateless HTTP API calls do not
  leak; the tab that owned it gets it reopened transparently on its next call.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import SessionError

IDLE_TIMEOUT_S = 15 * 60      # a session unused this long (and not training) is closed


@dataclass
class _Entry:
    session: object          # d3po_studio.core.session.Session
    owner: str               # Gradio session_hash of the tab that opened it
    opener: object           # opener(folder) -> Session: reopens it after an idle close
    used: float = field(default_factory=time.monotonic)


class SessionRegistry:
    """Open sessions by resolved folder, each owned by one tab. Thread-safe."""

    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S, sweep: bool = True):
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.Lock()
        self._open: dict[Path, _Entry] = {}
        self._closing: dict[Path, threading.Event] = {}     # folders whose close is under way
        self._idle: dict[str, tuple[Path, object, float]] = {}   # owner -> folder closed for idleness
        self._sweeper = None if sweep else False

    # ------------------------------------------------------------ open
    def open(self, folder, owner: str, opener):
        """Open ``folder`` for tab ``owner`` with ``opener(folder) -> Session``.

        The tab's previous session (if another folder) is closed. Opening a folder this tab
        already holds returns that session. A folder being closed is opened once it is closed.
        """
        folder = Path(folder).resolve()
        while True:
            with self._lock:
                closing = self._closing.get(folder)
                if closing is None:
                    session, previous = self._open_locked(folder, owner, opener)
                    break
            closing.wait()
        for f, entry in previous:
            self._finish_close(f, entry)
        return session

    def _open_locked(self, folder: Path, owner: str, opener):
        entry = self._open.get(folder)
        if entry is not None and entry.owner != owner:
            raise SessionError(f"session {folder.name!r} is open in another browser tab; "
                               "close it there, or open another session here")
        if entry is not None:
            entry.used = time.monotonic()
            return entry.session, []
        previous = self._take_locked(lambda f, e: e.owner == owner)
        session = opener(folder)          # raises SessionError if another process holds it
        self._open[folder] = _Entry(session, owner, opener)
        self._idle.pop(owner, None)
        self._start_sweeper_locked()
        return session, previous

    def reopen(self, folder, owner: str, opener, restore):
        """Close ``folder`` (held by ``owner``; its queued updates finish first) and open it with
        ``opener``, e.g. with new settings. If that fails, ``restore(folder)`` opens it as it was
        and the error is raised."""
        folder = Path(folder).resolve()
        with self._lock:
            entry = self._entry_locked(folder, owner)
            [(folder, entry)] = self._take_locked(lambda f, e: f == folder)
            done = self._closing[folder]
        error = None
        try:
            entry.session.close()
            try:
                session, kept = opener(folder), opener
            except BaseException as e:
                session, kept, error = restore(folder), restore, e
            with self._lock:
                self._open[folder] = _Entry(session, owner, kept)
        finally:
            with self._lock:
                self._closing.pop(folder, None)
            done.set()
        if error is not None:
            raise error
        return session

    # ------------------------------------------------------------- get
    def get(self, folder, owner: str):
        """The session at ``folder`` if tab ``owner`` holds it (reopened if it was closed for
        idleness), else a SessionError."""
        folder = Path(folder).resolve() if folder else None
        while True:
            with self._lock:
                closing = self._closing.get(folder)
                if closing is None:
                    entry = self._open.get(folder) if folder else None
                    if entry is not None and entry.owner == owner:
                        entry.used = time.monotonic()
                        return entry.session
                    idle = self._idle.get(owner)
                    break
            closing.wait()
        if folder is not None and idle is not None and idle[0] == folder:
            return self.open(folder, owner, idle[1])
        raise SessionError("no session is open in this tab: create one or resume one under Sessions")

    def _entry_locked(self, folder: Path, owner: str) -> _Entry:
        entry = self._open.get(folder)
        if entry is None or entry.owner != owner:
            raise SessionError("no session is open in this tab: create one or resume one under Sessions")
        return entry

    # ----------------------------------------------------------- close
    def close_owner(self, owner: str) -> None:
        """Close the session tab ``owner`` holds (when the tab closes), after its updates."""
        with self._lock:
            taken = self._take_locked(lambda f, e: e.owner == owner)
            self._idle.pop(owner, None)
        for folder, entry in taken:
            self._finish_close(folder, entry)

    def close_all(self) -> None:
        with self._lock:
            taken = self._take_locked(lambda f, e: True)
            self._idle.clear()
        for folder, entry in taken:
            self._finish_close(folder, entry)

    def sweep(self, now: float | None = None) -> list[Path]:
        """Close the sessions unused for ``idle_timeout_s`` that have no update queued or
        running; returns their folders. Their tabs get them reopened on their next call."""
        now = time.monotonic() if now is None else now
        with self._lock:
            taken = self._take_locked(lambda f, e: now - e.used > self.idle_timeout_s and not _busy(e.session))
            for folder, entry in taken:
                self._idle[entry.owner] = (folder, entry.opener, now)
            for owner in [o for o, (_, _, t) in self._idle.items() if now - t > 100 * self.idle_timeout_s]:
                del self._idle[owner]        # a tab gone for good: forget it
        for folder, entry in taken:
            self._finish_close(folder, entry)
        return [folder for folder, _ in taken]

    def holds(self, folder, owner: str) -> bool:
        """Whether tab ``owner`` holds ``folder``: open, being closed, or closed for idleness
        (``get`` then reopens it)."""
        folder = Path(folder).resolve()
        with self._lock:
            entry = self._open.get(folder)
            return (entry is not None and entry.owner == owner) or folder in self._closing or \
                (self._idle.get(owner) or (None,))[0] == folder

    def is_open(self, folder) -> bool:
        folder = Path(folder).resolve()
        with self._lock:
            return folder in self._open or folder in self._closing

    def _take_locked(self, which) -> list[tuple[Path, _Entry]]:
        """Remove the matching entries, marking their folders as closing."""
        taken = [(f, e) for f, e in self._open.items() if which(f, e)]
        for folder, _ in taken:
            del self._open[folder]
            self._closing[folder] = threading.Event()
        return taken

    def _finish_close(self, folder: Path, entry: _Entry) -> None:
        try:
            entry.session.close()
        finally:
            with self._lock:
                done = self._closing.pop(folder, None)
            if done is not None:
                done.set()

    def _start_sweeper_locked(self) -> None:
        if self._sweeper is None:
            interval = max(1.0, min(60.0, self.idle_timeout_s / 4))
            self._sweeper = threading.Thread(target=self._sweep_forever, args=(interval,),
                                             name="d3po-idle-sessions", daemon=True)
            self._sweeper.start()

    def _sweep_forever(self, interval: float) -> None:
        while True:
            time.sleep(interval)
            self.sweep()


def _busy(session) -> bool:
    try:
        p = session.pending()
    except SessionError:          # already closed elsewhere: nothing to wait for
        return False
    return bool(p["queued"]) or p["running"] is not None


# The registry of this process (one per server; tests may build their own).
REGISTRY = SessionRegistry()
