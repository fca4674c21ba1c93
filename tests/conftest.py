"""Shared fixtures: tiny pipelines built offline, and sessions on them.

Tests never touch a model hub: HF_HUB_OFFLINE is set for the whole run.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) each worker is one process on one core: one torch thread
# each, and the same for the processes the tests start (they inherit OMP_NUM_THREADS), so that two
# workers do not ask for four threads on two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_sd1():
    from d3po_studio.core.tiny import tiny_pipeline
    return tiny_pipeline("sd1")


@pytest.fixture
def tiny_sdxl():
    from d3po_studio.core.tiny import tiny_pipeline
    return tiny_pipeline("sdxl")


@pytest.fixture
def tiny_session(tmp_path, tiny_sd1):
    """A float32 session on the tiny SD1 pipeline, 4 DDIM steps, plain AdamW stepping every click
    (step_evidence off: the default waits until clicks agree, which plumbing tests do not)."""
    from d3po_studio import Session
    s = Session.open(tmp_path / "session", model="tiny-sd1", pipeline=tiny_sd1, steps=4,
                     dtype="float32", optimizer="adamw", lr=1e-2, step_evidence=False)
    yield s
    s.close()
