"""The update queue on its own (core/worker.py), with plain functions as jobs: order, sampling
priority, grace, cancel, wait and pending. No model: each test takes well under a second."""
import threading
import time

import pytest

from d3po_studio.core.errors import Cancelled, SessionError
from d3po_studio.core.worker import UpdateWorker


def _job(log, name, seconds=0.0, fail=None, steps=0):
    def run(progress):
        log.append(("start", name))
        for i in range(steps):
            time.sleep(seconds / max(steps, 1))
            progress(i + 1, steps)
        if not steps:
            time.sleep(seconds)
        if fail:
            raise fail
        log.append(("end", name))
        return {"name": name}
    return run


def test_jobs_run_one_at_a_time_in_submit_order_and_wait_returns_their_reports():
    w, log = UpdateWorker(grace_s=0.0), []
    positions = [w.submit(r, _job(log, r, 0.02))[1] for r in ("a", "b", "c")]
    assert positions == [1, 2, 3]            # 1 = the next to run, or running
    reports = w.wait(timeout=5)
    assert [r["round"] for r in reports] == ["a", "b", "c"]
    assert log == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b"), ("start", "c"), ("end", "c")]
    assert w.wait(timeout=1) == []          # each report is returned once
    assert w.pending() == {"queued": 0, "running": None, "step": 0, "total": 0}


def test_a_failed_job_is_reported_and_the_next_one_still_runs():
    w, log = UpdateWorker(grace_s=0.0), []
    w.submit("a", _job(log, "a", fail=FloatingPointError("nan")))
    w.submit("b", _job(log, "b"))
    reports = w.wait(timeout=5)
    assert reports[0] == {"round": "a", "error": "FloatingPointError: nan"}
    assert reports[1] == {"round": "b", "name": "b"}


def test_a_direct_job_gives_its_result_to_its_caller_only():
    w = UpdateWorker(grace_s=0.0)
    job, _ = w.submit("a", lambda p: {"x": 1}, grace=False, direct=True)
    assert job.result() == {"x": 1}
    failing, _ = w.submit("b", _job([], "b", fail=ValueError("bad")), grace=False, direct=True)
    with pytest.raises(ValueError, match="bad"):
        failing.result()
    assert w.wait(timeout=1) == []


def test_a_sample_right_after_a_click_runs_before_the_queued_update_which_starts_right_after():
    w, log = UpdateWorker(grace_s=5.0), []
    w.submit("a", _job(log, "a"))
    time.sleep(0.05)
    assert log == []                         # waiting for the sample that follows a click
    t0 = time.monotonic()
    with w.sampling():
        time.sleep(0.1)
        assert log == []                     # never during a sample
        log.append(("sample", None))
    w.wait(timeout=5)
    assert log[0] == ("sample", None) and log[1] == ("start", "a")
    assert time.monotonic() - t0 < 1.0       # not the whole 5 s grace: the sample ended it


def test_without_a_sample_the_update_starts_after_the_grace_period():
    w, log = UpdateWorker(grace_s=0.2), []
    t0 = time.monotonic()
    w.submit("a", _job(log, "a"))
    w.wait(timeout=5)
    assert 0.15 < time.monotonic() - t0 < 2.0


def test_pending_reports_the_running_round_and_its_step():
    w, seen = UpdateWorker(grace_s=0.0), []
    gate = threading.Event()

    def run(progress):
        progress(1, 3)
        gate.wait(5)
        return {}

    w.submit("a", run)
    w.submit("b", lambda p: {})
    deadline = time.monotonic() + 5
    while w.pending()["step"] != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    seen.append(w.pending())
    gate.set()
    w.wait(timeout=5)
    assert seen == [{"queued": 1, "running": "a", "step": 1, "total": 3}]


def test_cancel_drops_queued_jobs_and_stops_the_running_one_at_its_next_step():
    w, log, cancelled = UpdateWorker(grace_s=0.0), [], []
    w.submit("a", _job(log, "a", seconds=0.5, steps=10))
    w.submit("b", _job(log, "b"), on_cancel=lambda job: cancelled.append(job.round))
    while not log:
        time.sleep(0.01)
    t0 = time.monotonic()
    reports = {r["round"]: r for r in w.stop(cancel=True, timeout=5)}
    assert time.monotonic() - t0 < 0.4
    assert cancelled == ["b"] and ("start", "b") not in log and ("end", "a") not in log
    assert reports["a"]["error"].startswith("Cancelled") and reports["b"]["error"].startswith("Cancelled")


def test_the_thread_ends_when_the_queue_is_empty_and_restarts_for_the_next_job():
    w = UpdateWorker(grace_s=0.0)
    w.submit("a", lambda p: {})
    w.wait(timeout=5)
    deadline = time.monotonic() + 2
    while w._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w._thread is None
    w.submit("b", lambda p: {})
    assert [r["round"] for r in w.wait(timeout=5)] == ["b"]


def test_a_job_cannot_wait_for_its_own_queue_and_wait_times_out():
    w = UpdateWorker(grace_s=0.0)
    job, _ = w.submit("a", lambda p: w.join(), grace=False, direct=True)
    with pytest.raises(SessionError, match="cannot wait"):
        job.result()
    gate = threading.Event()
    w.submit("b", lambda p: gate.wait(5) and {})
    with pytest.raises(TimeoutError, match="still queued or running"):
        w.wait(timeout=0.05)
    gate.set()
    w.wait(timeout=5)
    assert issubclass(Cancelled, SessionError)
