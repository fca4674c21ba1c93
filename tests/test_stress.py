"""Randomized stress of one session folder: threads clicking, sampling, undoing, closing and
reopening; and a process doing the same, killed with SIGKILL at random moments.

After each run the folder reopens, HEAD's chain is intact, every round record points to an
existing checkpoint or says why not, and the applied updates are the clicks that returned
success less the undos that did. Seeded, tiny pipeline, 2 DDIM steps: ~30 s in all.
"""
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from d3po_studio import Session
from d3po_studio.core.errors import SessionError, UpdateError
from d3po_studio.core.tiny import tiny_pipeline

KW = dict(steps=2, dtype="float32", optimizer="adamw", keep_checkpoints=3, guidance=1.0)


def check_folder(folder, pipe=None) -> int:
    """Reopen ``folder`` and check what a reopen must find; returns the applied updates."""
    s = Session.open(folder, model="tiny", pipeline=pipe or tiny_pipeline("sd1"), **KW)
    try:
        chain = s.folder.chain(s.head)
        # whole back to the fresh LoRA, or back to where pruning (keep_checkpoints) cut it; undos
        # shorten it below keep_checkpoints, never to nothing while an update is applied
        assert len(chain) == s.updates or 1 <= len(chain) <= KW["keep_checkpoints"], (chain, s.updates)
        assert [s.folder.checkpoint_meta(c)["updates"] for c in chain] == \
            list(range(s.updates, s.updates - len(chain), -1))
        history = s.history()
        assert sum(r["status"] == "applied" for r in history) == s.updates
        assert not any(r["status"] in ("pending", "damaged") for r in history)
        for r in history:
            if r.get("checkpoint") and not r.get("checkpoint_pruned"):
                assert (s.folder.root / "checkpoints" / r["checkpoint"] / "meta.json").exists(), r
        return s.updates
    finally:
        s.close()


class Holder:
    """The session the threads share; one of them closes and reopens it now and then."""

    def __init__(self, folder, pipe):
        self.folder, self.pipe, self.lock = folder, pipe, threading.Lock()
        self.reopening = threading.Lock()       # one reopen at a time (like one tab reloading)
        self.session = self.open()
        self.done, self.undone = 0, 0

    def open(self):
        return Session.open(self.folder, model="tiny", pipeline=self.pipe, **KW)

    def count(self, reports):
        with self.lock:
            self.done += sum("error" not in r for r in reports)

    def reopen(self):
        with self.reopening:
            with self.lock:
                old = self.session
            self.count(old.close())
            with self.lock:
                self.session = self.open()


def _worker(holder: Holder, rng: random.Random, ops: int, errors: list):
    shown = []
    for _ in range(ops):
        s = holder.session
        op = rng.choices(["sample", "click", "click_async", "undo", "wait", "pending", "reopen"],
                         weights=[4, 3, 3, 1, 1, 1, 0.4])[0]
        try:
            if op == "sample":
                shown.append(s.sample("a red circle", n=2, seed=rng.randrange(1000)).id)
            elif op in ("click", "click_async") and shown:
                rid = shown.pop(rng.randrange(len(shown)))
                result = s.prefer(rid, best=rng.randrange(2), wait=op == "click")
                if op == "click":
                    holder.count([result])
                else:
                    assert result["queued"] and result["round"] == rid
            elif op == "undo":
                s.undo()
                with holder.lock:
                    holder.undone += 1
            elif op == "wait":
                holder.count(s.wait(timeout=60))
            elif op == "pending":
                p = s.pending()
                assert p["queued"] >= 0 and p["updates"] >= 0
            elif op == "reopen":
                holder.reopen()
        except SessionError as e:
            # a closed session (another thread reopened it: the click was not recorded), a round
            # that became another session's, nothing to undo
            if not any(m in str(e) for m in ("closed", "closing", "nothing to undo", "cannot undo further")):
                errors.append(e)
        except UpdateError as e:
            errors.append(e)
        except BaseException as e:     # anything else is a bug
            errors.append(e)


def test_threads_clicking_sampling_undoing_and_reopening_keep_the_folder_consistent(tmp_path):
    pipe = tiny_pipeline("sd1")
    holder = Holder(tmp_path / "s", pipe)
    errors: list = []
    threads = [threading.Thread(target=_worker, args=(holder, random.Random(seed), 25, errors))
               for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not any(t.is_alive() for t in threads)
    holder.count(holder.session.close())
    assert not errors, errors[:3]
    assert holder.done > 10
    assert check_folder(tmp_path / "s", pipe) == holder.done - holder.undone


CHILD = textwrap.dedent("""
    import random, sys, torch
    torch.set_num_threads(1)
    from d3po_studio import Session
    from d3po_studio.core.errors import SessionError
    from d3po_studio.core.tiny import tiny_pipeline
    kw = dict(steps=2, dtype="float32", optimizer="adamw", keep_checkpoints=3, guidance=1.0)
    s = Session.open(sys.argv[1], model="tiny", pipeline=tiny_pipeline("sd1"), **kw)
    rng = random.Random(int(sys.argv[2]))
    print("updates", s.updates, flush=True)
    while True:
        op = rng.choices(["click", "click_async", "undo"], weights=[4, 2, 1])[0]
        try:
            if op == "undo":
                s.undo()
                print("undo", flush=True)
                continue
            batch = s.sample("a red circle", n=2, seed=rng.randrange(1000))
            s.prefer(batch, best=rng.randrange(2), wait=op == "click")
            if op == "click":
                print("click", flush=True)
            else:
                print("queued", flush=True)
                for r in s.wait():
                    print("click" if "error" not in r else "failed", flush=True)
        except SessionError as e:
            print("refused", e, flush=True)
""")


def test_a_process_killed_at_random_moments_leaves_a_folder_that_reopens_consistent(tmp_path):
    folder, rng = tmp_path / "s", random.Random(1)
    for run in range(2):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(run)], stdout=subprocess.PIPE,
                                 text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        start_updates, done, undone, deadline = None, 0, 0, time.time() + 120
        kill_after = rng.randrange(4, 14)        # output lines: kills land in sampling, updates, writes
        for line in child.stdout:
            word = line.split()[0]
            if word == "updates":
                start_updates = int(line.split()[1])
            done += word == "click"
            undone += word == "undo"
            if done + undone >= kill_after:
                time.sleep(rng.random() * 0.2)
                child.send_signal(signal.SIGKILL)
                break
            assert time.time() < deadline, "child too slow"
        child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        updates = check_folder(folder)
        expected = start_updates + done - undone
        # killed between a change on disk and its printed line: at most one step either way
        assert abs(updates - expected) <= 1, (updates, expected)
