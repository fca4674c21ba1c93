"""Waiting for a click: a board of pending picks keyed by node id, answered over HTTP.

The Pick node registers a wait on the board, then tells the page, then blocks on the wait's
threading.Event (on ComfyUI's worker thread, so the server stays free); the page posts the
choice to /d3po/pick, whose handler (`handle_post`) answers the wait. The wait polls the host
for an interrupt and may have a timeout.

    with BOARD.waiting(node_id, {"round": ..., "n": 2}) as result:
        send_the_event_to_the_page()
        answer = result(check_interrupt, timeout_s=300)

    POST /d3po/pick {"node_id": "7", "index": 1}      the picked image
    POST /d3po/pick {"node_id": "7", "none": true}     none of them is better
    POST /d3po/pick {"node_id": "7", "cancel": true}   stop the run
    GET  /d3po/pick                                    {node_id: {"round": id, "n": n}} waiting now
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field

from ..core.errors import D3POError


@dataclass
class Answer:
    index: int | None = None      # the picked image
    none: bool = False            # "none is better": logged, nothing trained
    cancel: bool = False          # stop the run


@dataclass
class _Wait:
    info: dict
    event: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None


class PickBoard:
    """Pending picks of this process. Thread-safe; one wait per node id at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waits: dict[str, _Wait] = {}

    def pending(self) -> dict:
        with self._lock:
            return {node: dict(w.info) for node, w in self._waits.items()}

    def answer(self, node_id: str, answer: Answer) -> bool:
        """Release the wait of ``node_id``; False if nothing waits there."""
        with self._lock:
            wait = self._waits.get(str(node_id))
            if wait is None:
                return False
            if answer.index is not None and not 0 <= answer.index < wait.info["n"]:
                raise ValueError(f"index {answer.index} is out of range: this round has {wait.info['n']} images")
            wait.answer = answer
        wait.event.set()
        return True

    @contextlib.contextmanager
    def waiting(self, node_id: str, info: dict):
        """Register a wait for ``node_id`` (``info`` must hold ``n``, the number of images) and
        yield a function ``result(check_interrupt, timeout_s=0, poll_s=0.1) -> Answer``.

        Register first, then tell the page: an answer posted as soon as the page hears of the
        round finds the wait already there. The wait is removed when the block ends."""
        node_id = str(node_id)
        wait = _Wait(dict(info))
        with self._lock:
            self._waits[node_id] = wait       # a rerun of the same node replaces a stale wait
        try:
            yield functools.partial(_block, wait, node_id)
        finally:
            with self._lock:
                if self._waits.get(node_id) is wait:
                    del self._waits[node_id]


class PickTimeout(D3POError):
    """Nobody answered the pick within the Pick node's timeout."""


def _block(wait: _Wait, node_id: str, check_interrupt, timeout_s: float = 0, poll_s: float = 0.1) -> Answer:
    """Wait for the answer; ``check_interrupt()`` runs every ``poll_s`` and may raise to stop.
    ``timeout_s`` > 0 raises PickTimeout once that many seconds pass without an answer."""
    deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
    while not wait.event.wait(poll_s):
        check_interrupt()
        if deadline is not None and time.monotonic() >= deadline:
            raise PickTimeout(f"no pick on node {node_id} within {timeout_s:g} s, so this run stops and the "
                              "queue moves on; the round stays unanswered. Queue again for a new round, or "
                              "set the Pick node's timeout_s to 0 to wait without limit.")
    return wait.answer


def parse_answer(payload) -> tuple[str, Answer]:
    """(node_id, Answer) from the JSON body of POST /d3po/pick; ValueError says what is wrong."""
    if not isinstance(payload, dict) or "node_id" not in payload:
        raise ValueError('expected {"node_id": ..., and one of "index": i, "none": true, "cancel": true}')
    given = [k for k in ("index", "none", "cancel") if payload.get(k) is not None and payload.get(k) is not False]
    if len(given) != 1:
        raise ValueError(f'give exactly one of "index", "none" or "cancel" (got {given or "none"})')
    index = payload.get("index")
    if given == ["index"] and (isinstance(index, bool) or not isinstance(index, int)):
        raise ValueError(f'"index" must be an integer, got {index!r}')
    return str(payload["node_id"]), Answer(index=index, none=bool(payload.get("none")),
                                            cancel=bool(payload.get("cancel")))


def handle_post(board: PickBoard, payload) -> tuple[int, dict]:
    """The POST /d3po/pick handler shared by ComfyUI's aiohttp route and PlainHost.serve."""
    try:
        node_id, answer = parse_answer(payload)
        if not board.answer(node_id, answer):
            return 404, {"error": f"no pick is waiting on node {node_id}"}
    except ValueError as e:
        return 400, {"error": str(e)}
    return 200, {"ok": True}


BOARD = PickBoard()   # the process's board: ComfyUI's route and the Pick node share it
