"""A session as a state machine with one owner, and a damaged folder handled the right way round.

Each test is one reproduction from issue 10 (it failed before the session engine was rebuilt):
close during an update, reload-and-resume and apply-settings during an update (app registry),
undo with a truncated parent, deleted HEAD, a garbage round file, a truncated optimizer, lr
changed on reopen, open without model; plus the update queue's order and pruning's promise.
"""
import threading
import time

import pytest
import torch

from d3po_studio import Session
from d3po_studio.core.config import Settings
from d3po_studio.core.errors import ConfigError, SessionError
from d3po_studio.core.lora import lora_state
from d3po_studio.core.tiny import tiny_pipeline
from d3po_studio.gradio_app.registry import SessionRegistry

KW = dict(steps=3, dtype="float32", optimizer="adamw")


def _open(folder, **kw):
    return Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"), **{**KW, **kw})


def _slow(seconds=0.15):
    return lambda i, n: time.sleep(seconds)


def _wait_running(s, timeout=10):
    """Until an update has done its first step."""
    deadline = time.monotonic() + timeout
    while s.pending()["step"] < 1:
        assert time.monotonic() < deadline, "the update never started"
        time.sleep(0.01)


def _lora(s):
    return lora_state(s.pipe.unet, s.adapter)


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clicks(s, k, start=0):
    for seed in range(start, start + k):
        s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)


def _invariants(folder):
    """HEAD's chain is intact and every round agrees with it (what a reopen must find)."""
    s = _open(folder)
    try:
        chain = s.folder.chain(s.head)
        assert len(chain) == min(s.updates, s.settings.keep_checkpoints)
        applied = [r for r in s.history() if r["status"] == "applied"]
        assert len(applied) == s.updates
        for r in s.history():
            if r.get("checkpoint") and not r.get("checkpoint_pruned"):
                assert (s.folder.root / "checkpoints" / r["checkpoint"] / "meta.json").exists(), r
        return s.updates
    finally:
        s.close()


# ------------------------------------------------------------------ the update queue
def test_click_then_sample_samples_first_and_updates_land_in_click_order(tmp_path):
    s = _open(tmp_path / "s")
    b1 = s.sample("a red circle", n=2, seed=0)
    lora0 = _lora(s)
    queued = s.prefer(b1, best=0, wait=False)
    assert queued == {"queued": True, "round": b1.id, "position": 1}
    assert s.history()[-1]["status"] == "pending"        # the click is on disk at once
    b2 = s.sample("a red circle", n=2, seed=1)            # drawn before the update, LoRA one click behind
    assert s.updates == 0 and _same(_lora(s), lora0)
    q2 = s.prefer(b2, best=1, wait=False)
    assert q2["round"] == b2.id and q2["position"] in (1, 2)
    reports = s.wait(timeout=60)
    assert [r["round"] for r in reports] == [b1.id, b2.id] and [r["updates"] for r in reports] == [1, 2]
    assert s.pending() == {"queued": 0, "running": None, "step": 0, "total": 0, "updates": 2}
    r1, r2 = s.history()
    assert s.folder.checkpoint_meta(r2["checkpoint"])["parent"] == r1["checkpoint"]
    s.close()


def test_pending_shows_the_running_update_and_its_step(tmp_path):
    s = _open(tmp_path / "s")
    s.prefer(s.sample("a", seed=0), best=0, wait=False, progress=_slow())
    _wait_running(s)
    p = s.pending()
    assert p["running"] == s.history()[-1]["id"] and p["total"] == 3 and p["updates"] == 0
    s.wait(timeout=60)
    s.close()


# -------------------------------------------------------------------- close
def test_close_during_an_update_waits_for_it_then_every_call_is_refused(tmp_path):
    s = _open(tmp_path / "s")
    batch = s.sample("a", seed=0)
    s.prefer(batch, best=0, wait=False, progress=_slow())
    _wait_running(s)
    s.close()                                   # waits: the click is trained, not lost
    for call in (lambda: s.sample("a"), lambda: s.prefer(batch, best=1), s.undo, s.pending, s.wait,
                 s.history, s.info, lambda: s.export_lora(tmp_path / "x.safetensors")):
        with pytest.raises(SessionError, match="closed"):
            call()
    s.close()                                   # twice is fine
    s2 = _open(tmp_path / "s")
    assert s2.updates == 1 and s2.history()[-1]["status"] == "applied"
    s2.close()


def test_close_cancel_rolls_back_the_running_update_and_cancels_the_queued_ones(tmp_path):
    s = _open(tmp_path / "s")
    fresh = _lora(s)
    for seed in (0, 1):
        s.prefer(s.sample("a", seed=seed), best=0, wait=False, progress=_slow())
    _wait_running(s)
    s.close(cancel=True)
    s2 = _open(tmp_path / "s")
    assert s2.updates == 0 and _same(_lora(s2), fresh)
    assert [r["status"] for r in s2.history()] == ["cancelled", "cancelled"]
    assert all("Cancelled" in r["error"] for r in s2.history())
    s2.close()


# --------------------------------------------------------------- app registry
def test_reload_and_resume_during_an_update_waits_for_it(tmp_path):
    """Repro 1: click, reload the tab within ~1.5 s, resume the session, click again."""
    reg = SessionRegistry(sweep=False)
    folder = tmp_path / "s"
    s = reg.open(folder, "tab1", _open)
    s.prefer(s.sample("a", seed=0), best=0, wait=False, progress=_slow())
    _wait_running(s)
    closer = threading.Thread(target=reg.close_owner, args=("tab1",))   # the tab's unload
    closer.start()
    time.sleep(0.05)
    s2 = reg.open(folder, "tab2", _open)        # the reloaded tab resumes: waits for the close
    closer.join()
    assert s2 is not s and s2.updates == 1
    s2.prefer(s2.sample("a", seed=1), best=1)
    history = s2.history()
    assert [r["status"] for r in history] == ["applied", "applied"] and s2.updates == 2
    assert all((folder / "checkpoints" / r["checkpoint"] / "meta.json").exists() for r in history)
    reg.close_all()


def test_apply_settings_during_an_update_reopens_after_it_with_the_new_lr(tmp_path):
    """Repro 2: /apply_settings during a running /prefer."""
    reg = SessionRegistry(sweep=False)
    folder = tmp_path / "s"
    s = reg.open(folder, "tab", _open)
    s.prefer(s.sample("a", seed=0), best=0, wait=False, progress=_slow())
    _wait_running(s)
    s2 = reg.reopen(folder, "tab", lambda f: _open(f, lr=1e-3), _open)
    assert s.closed and s2.updates == 1 and s2.settings.lr == 1e-3
    assert [g["lr"] for g in s2.optimizer.param_groups] == [1e-3]
    assert s2.history()[-1]["status"] == "applied"
    assert reg.get(folder, "tab") is s2
    reg.close_all()


def test_an_idle_session_is_closed_and_its_tab_gets_it_back(tmp_path):
    """Sessions of stateless API calls do not stay open (and locked) until the server stops."""
    reg = SessionRegistry(idle_timeout_s=60, sweep=False)
    busy = reg.open(tmp_path / "busy", "api-call-1", _open)
    idle = reg.open(tmp_path / "idle", "api-call-2", _open)
    busy.prefer(busy.sample("a", seed=0), best=0, wait=False, progress=_slow())
    _wait_running(busy)
    assert reg.sweep(now=time.monotonic() + 61) == [(tmp_path / "idle").resolve()]
    assert idle.closed and not busy.closed      # one still training is left alone
    assert reg.holds(tmp_path / "idle", "api-call-2") and not reg.is_open(tmp_path / "idle")
    _open(tmp_path / "idle").close()             # its folder lock was released
    again = reg.get(tmp_path / "idle", "api-call-2")
    assert again is not idle and again.updates == 0
    with pytest.raises(SessionError, match="no session is open in this tab"):
        reg.get(tmp_path / "idle", "someone-else")
    reg.close_all()


# ------------------------------------------------------------ damaged folders
def test_undo_with_a_truncated_parent_changes_nothing(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 2)
    before = _lora(s)
    parent = tmp_path / "s" / "checkpoints" / "000001" / "lora.safetensors"
    parent.write_bytes(parent.read_bytes()[:50])
    with pytest.raises(SessionError, match=r"000001/lora.safetensors.*stays at update 2"):
        s.undo()
    assert s.updates == 2 and s.folder.head() == "000002" and _same(_lora(s), before)
    s.close()
    s2 = _open(tmp_path / "s")
    assert s2.updates == 2 and _same(_lora(s2), before)
    s2.close()


def test_a_deleted_head_reopens_at_the_newest_applied_checkpoint(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 3)
    s.undo()
    lora = _lora(s)
    s.close()
    (tmp_path / "s" / "HEAD").unlink()
    s2 = _open(tmp_path / "s")
    assert s2.updates == 2 and _same(_lora(s2), lora)        # not 0, and not the undone third
    assert any("HEAD is missing" in n for n in s2.notes) and "HEAD is missing" in s2.info()["notes"][0]
    assert s2.folder.head() == "000002"                       # rewritten
    _clicks(s2, 1, start=10)                                  # the next click prunes nothing it needs
    assert s2.folder.chain(s2.head) == ["000004", "000002", "000001"]
    s2.close()
    assert _invariants(tmp_path / "s") == 3


def test_an_unreadable_head_is_never_read_as_zero_updates(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 2)
    s.close()
    (tmp_path / "s" / "HEAD").write_text("{garbage")
    s2 = _open(tmp_path / "s")
    assert s2.updates == 2 and "unreadable" in s2.notes[0]
    s2.close()


def test_a_damaged_head_checkpoint_reopens_at_its_parent_and_says_so(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 2)
    s.close()
    lora = tmp_path / "s" / "checkpoints" / "000002" / "lora.safetensors"
    lora.write_bytes(b"")
    s2 = _open(tmp_path / "s")
    assert s2.updates == 1 and s2.folder.head() == "000001"
    assert "000002/lora.safetensors" in s2.notes[0]
    assert [r["status"] for r in s2.history()] == ["applied", "lost"]
    s2.close()


def test_nothing_intact_is_refused_naming_the_file_and_the_way_out(tmp_path):
    s = _open(tmp_path / "s", keep_checkpoints=1)
    _clicks(s, 2)
    s.close()
    (tmp_path / "s" / "checkpoints" / "000002" / "lora.safetensors").write_bytes(b"x")
    with pytest.raises(SessionError, match=r"000002/lora.safetensors.*Restore that file"):
        _open(tmp_path / "s")
    _open(tmp_path / "t").close()      # the failed open released its lock and its adapter


def test_one_garbage_round_file_costs_that_record_only(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 2)
    s.close()
    first = sorted((tmp_path / "s" / "rounds").iterdir())[0] / "round.json"
    first.write_text("not json")
    s2 = _open(tmp_path / "s")
    history = s2.history()
    assert s2.updates == 2 and [r["status"] for r in history] == ["damaged", "applied"]
    assert "round.json" in history[0]["error"]
    _clicks(s2, 1, start=5)
    assert s2.updates == 3
    s2.close()


def test_a_truncated_optimizer_costs_a_fresh_optimizer_state_said_clearly(tmp_path):
    s = _open(tmp_path / "s")
    _clicks(s, 2)
    lora = _lora(s)
    s.close()
    opt = tmp_path / "s" / "checkpoints" / "000002" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    s2 = _open(tmp_path / "s")
    assert s2.updates == 2 and _same(_lora(s2), lora)
    assert "000002/optimizer.pt" in s2.notes[0] and "optimizer state starts fresh" in s2.notes[0]
    assert s2.optimizer.state_dict()["state"] == {}
    _clicks(s2, 1, start=5)
    s2.close()


# ----------------------------------------------------------------- settings
def test_lr_changed_on_reopen_applies_to_the_next_update(tmp_path):
    plain = {"step_rms": None} if "step_rms" in Settings().to_dict() else {}   # lr alone sets the step
    s = _open(tmp_path / "s", lr=1e-2, **plain)
    _clicks(s, 1)
    s.close()
    s2 = _open(tmp_path / "s", lr=1e-9, **plain)
    assert [g["lr"] for g in s2.optimizer.param_groups] == [1e-9]
    before = _lora(s2)
    _clicks(s2, 1, start=1)
    change = max((v - before[k]).abs().max().item() for k, v in _lora(s2).items())
    assert change < 1e-6                  # lr 1e-2 moves these weights by ~1e-2
    s2.close()
    with pytest.raises(ConfigError, match="fixed after the first update.*start a new session"):
        _open(tmp_path / "s", lora_targets=["to_q"])


def test_open_without_model_resumes_with_the_folders_model(tmp_path):
    s = Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_pipeline("sd1"), **KW)
    s.close()
    s2 = Session.open(tmp_path / "s", pipeline=tiny_pipeline("sd1"))
    assert s2.meta["model"] == "tiny-sd1"
    s2.close()


# ------------------------------------------------------------------ pruning
def test_pruning_keeps_heads_chain_and_says_so_in_each_round_it_empties(tmp_path):
    s = _open(tmp_path / "s", keep_checkpoints=2)
    _clicks(s, 4)
    s.undo()
    _clicks(s, 1, start=10)
    assert s.folder.checkpoint_names() == ["000003", "000005"]
    statuses = [(r["status"], r.get("checkpoint_pruned", False)) for r in s.history()]
    assert statuses == [("applied", True), ("applied", True), ("applied", False), ("undone", True),
                        ("applied", False)]
    s.close()
    assert _invariants(tmp_path / "s") == 4


def test_a_script_that_ends_without_close_still_trains_its_queued_clicks(tmp_path):
    """The update thread is not a daemon: the interpreter waits for the queue before it exits."""
    import subprocess
    import sys
    script = ("import sys; from d3po_studio import Session; from d3po_studio.core.tiny import tiny_pipeline\n"
              "s = Session.open(sys.argv[1], model='tiny', pipeline=tiny_pipeline('sd1'), steps=3, "
              "dtype='float32', optimizer='adamw')\n"
              "print(s.prefer(s.sample('a', seed=0), best=0, wait=False)['queued'])\n")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True,
                         timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
    s = _open(tmp_path / "s")
    assert s.updates == 1 and s.history()[0]["status"] == "applied"
    s.close()
