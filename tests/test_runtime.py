"""The automatic attention choice when xformers imports but cannot run (seen on an H100: xformers
0.0.35, built for torch 2.10 with CUDA 12.8, under torch 2.11 with CUDA 13 imports, then every
attention raises NotImplementedError and every click failed)."""
import sys
import types

import pytest
import torch

from d3po_studio.core import runtime
from d3po_studio.core.errors import ConfigError


def _fake_xformers(monkeypatch, attention):
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = attention
    xformers = types.ModuleType("xformers")
    xformers.__version__, xformers.ops = "0.0.35", ops
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def _no_kernels(q, k, v):
    raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs:\n  query")


def test_xformers_that_cannot_run_is_not_chosen(monkeypatch):
    _fake_xformers(monkeypatch, _no_kernels)
    why = runtime._xformers_fails(torch.device("cpu"))
    assert "does not run here" in why and "NotImplementedError: No operator found" in why
    assert f"torch {torch.__version__}" in why and "query" not in why       # first line only
    monkeypatch.setattr(runtime, "_xformers_fails", lambda dev: why)        # as on the H100's CUDA
    notes = []
    assert runtime._choose_attention("auto", torch.device("cuda"), notes) == "sdpa"
    assert notes == [f"attention: torch SDPA (fallback: {why})"]
    with pytest.raises(ConfigError, match="attention='xformers' is not available: xformers 0.0.35 is installed"):
        runtime._choose_attention("xformers", torch.device("cuda"), [])


def test_xformers_that_runs_is_chosen_on_cuda_only(monkeypatch):
    calls = []
    _fake_xformers(monkeypatch, lambda q, k, v: calls.append(q.shape) or q)
    assert runtime._xformers_fails(torch.device("cpu")) is None and calls == [(1, 2, 40)]
    monkeypatch.setattr(runtime, "_xformers_fails", lambda dev: None)
    notes = []
    assert runtime._choose_attention("auto", torch.device("cuda"), notes) == "xformers"
    assert notes == ["attention: xformers (auto: CUDA, and xformers runs here)"]
    assert runtime._choose_attention("auto", torch.device("cpu"), []) == "sdpa"
