"""A session process killed with SIGKILL mid-update reopens at its last completed update."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

from d3po_studio import Session
from d3po_studio.core.lora import lora_state
from d3po_studio.core.tiny import tiny_pipeline

CHILD = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from d3po_studio import Session
    from d3po_studio.core.tiny import tiny_pipeline
    s = Session.open(sys.argv[1], model="tiny", pipeline=tiny_pipeline("sd1"), steps=6, dtype="float32",
                     optimizer="adamw")
    for k in range(100):
        batch = s.sample("a red circle", n=2, seed=k)
        s.prefer(batch, best=k % 2, progress=lambda i, n: print("step", i, flush=True))
        print("done", s.updates, flush=True)
""")


@pytest.mark.parametrize("delay", [0.0, 0.15])
def test_sigkill_during_update_reopens_at_last_completed_update(tmp_path, delay):
    folder = tmp_path / "session"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    completed, steps_after = 0, 0
    deadline = time.time() + 300
    for line in child.stdout:
        if line.startswith("done"):
            completed = int(line.split()[1])
        elif line.startswith("step") and completed >= 2:
            steps_after += 1
            if steps_after == 3:            # mid-update: a few kept steps are backpropagated
                time.sleep(delay)           # 0.15 s: often inside the checkpoint write
                child.send_signal(signal.SIGKILL)
                break
        assert time.time() < deadline, "child too slow"
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL

    # every file on disk parses
    for path in folder.rglob("*"):
        if path.name.endswith(".json") or path.name == "HEAD":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors" and not path.name.startswith("."):
            load_file(str(path))
    s = Session.open(folder, model="tiny", pipeline=tiny_pipeline("sd1"))
    try:
        assert s.updates in (completed, completed + 1)   # +1: killed after HEAD moved, before printing
        lora, _, meta = s.folder.read_checkpoint(s.head)
        assert meta["updates"] == s.updates
        now = lora_state(s.pipe.unet)
        assert all(torch.equal(lora[k], now[k]) for k in lora)
        statuses = [r["status"] for r in s.history()]
        assert "pending" not in statuses
        assert statuses.count("applied") == s.updates
        # and the reopened session keeps working
        s.prefer(s.sample("a red circle", n=2, seed=1000), best=0)
        assert s.updates == statuses.count("applied") + 1
    finally:
        s.close()
