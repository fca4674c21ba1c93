"""Cancel for long actions (sample, compare, and the updates of a tab's clicks): flags per tab.

- An action the tab runs in the request thread (sample, compare) registers a fresh flag
  (``CancelFlags.running``) and a check on the UNet that fires only in that thread (``stop_when``;
  the pipeline may be shared with other tabs' sessions): Cancel stops it at its next UNet call.
- Updates run in the session's worker thread (``Session.prefer(wait=False)``); each gets the
  tab's update flag through its progress callback (``stop_updates``), so Cancel stops the running
  one at its next step and every queued one at its first. The core rolls a cancelled update back
  and marks its round ``cancelled``.

Both raise ``core.errors.Cancelled``.
"""
from __future__ import annotations

import contextlib
import threading

from ..core.errors import Cancelled


class CancelFlags:
    """The flags of what each tab is running. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._actions: dict[str, threading.Event] = {}
        self._updates: dict[str, tuple[threading.Event, object]] = {}   # tab -> (flag, session)

    def cancel(self, tab: str):
        """Raise the flags of ``tab``'s running action and of its queued and running updates.
        Returns (whether an action was running, the session its updates were queued on or None);
        never waits for anything."""
        with self._lock:
            action, updates = self._actions.get(tab), self._updates.pop(tab, None)
        session = None
        if updates is not None:
            updates[0].set()
            session = updates[1]
        running = action is not None and not action.is_set()
        if running:
            action.set()
        return running, session

    def update_flag(self, tab: str, session) -> threading.Event:
        """The flag for the updates ``tab`` queues on ``session`` from now on (a new one after a Cancel)."""
        with self._lock:
            flag, _ = self._updates.get(tab, (threading.Event(), None))
            self._updates[tab] = (flag, session)
            return flag

    @contextlib.contextmanager
    def running(self, tab: str):
        """An action of ``tab`` starts: its flag is raised by Cancel from now on (also while a
        session is still being opened for it); pass it to ``stop_when`` around the work."""
        flag = threading.Event()
        with self._lock:
            self._actions[tab] = flag
        try:
            yield flag
        finally:
            with self._lock:
                if self._actions.get(tab) is flag:
                    del self._actions[tab]


@contextlib.contextmanager
def stop_when(flag: threading.Event, unet):
    """While inside, a call of ``unet`` from this thread raises ``Cancelled`` once ``flag`` is set
    (at once if it is set already)."""
    thread = threading.get_ident()

    def check(module=None, args=None):
        if flag.is_set() and threading.get_ident() == thread:
            raise Cancelled("cancelled by the user; nothing from this action was kept")
    check()
    handle = unet.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def stop_updates(flag: threading.Event, report=None):
    """A progress callback for an update: raises ``Cancelled`` once ``flag`` is set, and passes
    ``(i, total)`` on to ``report``."""
    def progress(i: int, total: int) -> None:
        if flag.is_set():
            raise Cancelled("the update was cancelled by the user")
        if report is not None:
            report(i, total)
    return progress
