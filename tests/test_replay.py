"""Replay training from a session's log: one process vs `accelerate launch --num_processes 2 --cpu`."""
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from d3po_studio import Session
from d3po_studio.core.tiny import tiny_pipeline

CLI = [sys.executable, "-m", "d3po_studio.cli"]


@pytest.fixture(scope="module")
def logged_session(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    tiny_pipeline("sd1", seed=1).save_pretrained(root / "model")
    folder = root / "session"
    with Session.open(folder, model=str(root / "model"), steps=3, dtype="float32", optimizer="adamw",
                      lr=1e-2) as s:
        for seed in range(4):
            s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)
        s.prefer(s.sample("a red circle", n=3, seed=9), ranking=[2, 1, 0])
        s.undo()                                   # undone preferences are not replayed
        s.prefer(s.sample("a red circle", n=2, seed=10), none=True)
    return folder


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400, **kw)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_replay_single_vs_two_processes(logged_session, tmp_path):
    single, parallel = tmp_path / "single.safetensors", tmp_path / "dp.safetensors"
    _run(CLI + ["train", str(logged_session), "--epochs", "2", "--batch", "4", "--out", str(single)])
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    _run([accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", "-m", "d3po_studio.cli", "train", str(logged_session), "--epochs", "2",
          "--batch", "4", "--out", str(parallel)])
    a, b = load_file(str(single)), load_file(str(parallel))
    assert a.keys() == b.keys() and len(a) > 0
    moved = [k for k in a if k.endswith("lora_up.weight") and a[k].abs().max() > 0]
    assert moved, "replay training changed the LoRA"
    # Same effective batch: equal up to float summation order across processes.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_replay_uses_only_live_preferences(logged_session):
    from d3po_studio.core.replay import preferences
    from d3po_studio.core.storage import SessionFolder
    prefs = preferences(SessionFolder(logged_session))
    assert len(prefs) == 4 and all(len(pairs) == 1 for _, pairs in prefs)
