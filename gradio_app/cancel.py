"""Cancel for long actions (sample, compare, and the updates of a tab's clicks): flags per tab.

- An action the tab runs in the request thread (sample, compare) registers a fresh flag
  (``CancelFlags.running``) and a check on the UNet that fires only in that thread (the pipeline
  may be shared with other tabs' sessions): Cancel stops it at its next UNet call.
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
        self._updates: dict[str, threading.Event] = {}

    def cancel(self, tab: str) -> bool:
        """Raise the flags of ``tab``'s running action and of its queued and running updates.
        True if an action was running (the caller checks the updates itself)."""
        with self._lock:
            action, updates = self._actions.get(tab), self._updates.pop(tab, None)
        if updates is not None:
            updates.set()
        if action is None or action.is_set():
            return False
        action.set()
        return True

    def update_flag(self, tab: str) -> threading.Event:
        """The flag for the updates ``tab`` queues from now on (a new one after a Cancel)."""
        with self._lock:
            return self._updates.setdefault(tab, threading.Event())

    @contextlib.contextmanager
    def running(self, tab: str, unet):
        """Run an action of ``tab`` in this thread that Cancel can stop at its next UNet call."""
        flag = threading.Event()
        with self._lock:
            self._actions[tab] = flag
        try:
            with stop_when(flag, unet):
                yield flag
        finally:
            with self._lock:
                if self._actions.get(tab) is flag:
                    del self._actions[tab]


@contextlib.contextmanager
def stop_when(flag: threading.Event, unet):
    """While inside, a call of ``unet`` from this thread raises ``Cancelled`` once ``flag`` is set."""
    thread = threading.get_ident()

    def check(module, args):
        if flag.is_set() and threading.get_ident() == thread:
            raise Cancelled("cancelled by the user; nothing from this action was kept")
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
