"""The update queue of one session: clicks are trained one at a time, in click order, in a
background thread, and a sample asked for right after a click is drawn first.

    worker = UpdateWorker()
    job, position = worker.submit("000003-…", run, grace=True)   # run(progress) -> report
    with worker.sampling():        # a sample: no queued update starts while it runs
        ...
    worker.pending(); worker.wait(); worker.stop(cancel=False)

Order: a job waits, before it starts, until no sample is running and either a sample has
ended since the job was queued or ``grace_s`` has passed (``grace=False`` skips that wait).
So `prefer(wait=False)` then `sample()` samples the next pair with the LoRA one click behind,
and the update starts right after it. The thread ends when the queue is empty and is started
again by the next job; it is not a daemon, so a process finishes its queued updates before it
exits.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import Cancelled, SessionError

SAMPLE_GRACE_S = 0.5    # how long a queued update waits for the sample that usually follows a click


@dataclass(eq=False)
class Job:
    """One queued update."""
    round: str                          # the round id it trains
    run: object                         # run(progress) -> report dict; raises on failure
    grace: bool                         # wait (≤ grace_s) for a sample before starting
    direct: bool                        # the caller waits for this job itself (prefer(wait=True))
    on_cancel: object = None            # on_cancel(job) when the job is dropped before it ran
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    report: dict | None = None
    error: BaseException | None = None

    def result(self) -> dict:
        """The report (after ``done``), or the job's error raised again."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.report

    def summary(self) -> dict:
        """What ``wait()`` returns for this job."""
        if self.error is not None:
            return {"round": self.round, "error": f"{type(self.error).__name__}: {self.error}"}
        return {"round": self.round, **self.report}


class UpdateWorker:
    """A FIFO of update jobs run by one thread; thread-safe."""

    def __init__(self, name: str = "d3po-updates", grace_s: float = SAMPLE_GRACE_S):
        self.name, self.grace_s = name, grace_s
        self._cv = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._thread: threading.Thread | None = None
        self._holds = 0                      # samples running now
        self._last_sample = float("-inf")   # when the last sample ended (monotonic)
        self._step = (0, 0)
        self._cancel_running = False
        self._finished: list[Job] = []      # jobs not yet returned by wait()

    # ------------------------------------------------------------ submit
    def submit(self, round_id: str, run, grace: bool = True, direct: bool = False,
               on_cancel=None) -> tuple[Job, int]:
        """Queue ``run``; returns the job and its position (1 = the next to run)."""
        job = Job(round_id, run, grace, direct, on_cancel)
        with self._cv:
            self._queue.append(job)
            position = len(self._queue) + (self._running is not None)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self.name)
                self._thread.start()
            self._cv.notify_all()
        return job, position

    @contextlib.contextmanager
    def sampling(self):
        """Held by a sample: no queued job starts until it ends."""
        with self._cv:
            self._holds += 1
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                self._last_sample = time.monotonic()
                self._cv.notify_all()

    # ------------------------------------------------------------ observe
    def pending(self) -> dict:
        with self._cv:
            return {"queued": len(self._queue), "running": self._running.round if self._running else None,
                    "step": self._step[0], "total": self._step[1]}

    def busy(self) -> bool:
        with self._cv:
            return bool(self._queue) or self._running is not None

    def join(self, timeout: float | None = None) -> None:
        """Block until nothing is queued or running; TimeoutError after ``timeout`` seconds."""
        if threading.current_thread() is self._thread:
            raise SessionError("an update cannot wait for the update queue it runs in")
        with self._cv:
            if not self._cv.wait_for(lambda: not self._queue and self._running is None, timeout):
                raise TimeoutError(f"updates still queued or running after {timeout} s; call wait() "
                                   "again, or pending() to see them")

    def wait(self, timeout: float | None = None) -> list[dict]:
        """``join``, then the summaries of the jobs (not waited for directly) finished since the
        previous ``wait``, in click order."""
        self.join(timeout)
        with self._cv:
            done, self._finished = self._finished, []
        return [job.summary() for job in done]

    # ------------------------------------------------------------ stop
    def cancel(self) -> list[Job]:
        """Drop the queued jobs (each gets ``on_cancel``) and ask the running one to stop at its
        next progress step. Returns the dropped jobs."""
        with self._cv:
            dropped = list(self._queue)
            self._queue.clear()
            self._cancel_running = self._running is not None
            self._cv.notify_all()
        for job in dropped:
            job.error = Cancelled(f"the update of round {job.round} was cancelled before it ran")
            if job.on_cancel is not None:
                job.on_cancel(job)
            self._finish(job)
        return dropped

    def stop(self, cancel: bool = False, timeout: float | None = None) -> list[dict]:
        """Finish (or with ``cancel=True`` cancel) every job; returns what ``wait`` returns."""
        if cancel:
            self.cancel()
        return self.wait(timeout)

    # ------------------------------------------------------------ thread
    def _loop(self) -> None:
        while True:
            with self._cv:
                job = self._next_locked()
                if job is None:
                    self._thread = None
                    self._cv.notify_all()
                    return
            try:
                job.report = job.run(self._progress(job))
            except BaseException as e:      # handed to whoever waits for the job
                job.error = e
            self._finish(job)

    def _next_locked(self) -> Job | None:
        """Wait (holding the condition) until the first job may start; None when none is left."""
        while self._queue:
            delay = self._delay_locked(self._queue[0])
            if delay is not None and delay <= 0:
                job = self._queue.popleft()
                self._running, self._step, self._cancel_running = job, (0, 0), False
                return job
            self._cv.wait(delay)
        return None

    def _delay_locked(self, job: Job) -> float | None:
        if self._holds:
            return None                          # a sample is running: wait for it
        if not job.grace or self._last_sample >= job.enqueued:
            return 0.0
        return job.enqueued + self.grace_s - time.monotonic()

    def _progress(self, job: Job):
        def report(i: int, total: int) -> None:
            with self._cv:
                self._step = (i, total)
                cancel = self._cancel_running
            if cancel:
                raise Cancelled(f"the update of round {job.round} was cancelled (close(cancel=True))")
        return report

    def _finish(self, job: Job) -> None:
        with self._cv:
            if self._running is job:
                self._running, self._step = None, (0, 0)
            if not job.direct:
                self._finished.append(job)
            job.done.set()
            self._cv.notify_all()
