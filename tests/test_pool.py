"""Sessions sharing one pipeline (core/pool.py): one model loaded per process, one LoRA adapter per
session, the reference pass with every adapter off, and the pipeline dropped with its last session."""
import pytest
import torch

from d3po_studio import Session
from d3po_studio.bench.placement import PLACEMENTS
from d3po_studio.core.errors import SessionError
from d3po_studio.core.lora import add_lora, lora_disabled, lora_state
from d3po_studio.core.pool import POOL, ModelPool
from d3po_studio.core.tiny import tiny_pipeline

# The optimizer's own step (step_evidence=False): with the evidence step two clicks need not agree
# beyond chance, and the LoRAs whose separation these tests check would not move at all.
KW = dict(steps=3, dtype="float32", optimizer="adamw", step_evidence=False)


def _click(s, seed):
    s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    emb = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=emb).sample


def test_two_sessions_on_one_pipeline_keep_separate_loras_bit_exactly(tmp_path):
    alone = Session.open(tmp_path / "alone", model="tiny", pipeline=tiny_pipeline("sd1"), **KW)
    for seed in (0, 1):
        _click(alone, seed)
    expected = lora_state(alone.pipe.unet, alone.adapter)
    alone.close()

    pipe = tiny_pipeline("sd1")
    a = Session.open(tmp_path / "a", model="tiny", pipeline=pipe, **KW)
    b = Session.open(tmp_path / "b", model="tiny", pipeline=pipe, **KW, lr=5e-2, seed=7)
    assert a.pipe is b.pipe and (a.adapter, b.adapter) == ("d3po", "d3po_2")
    _click(a, 0)
    _click(b, 5)     # b trains in between: its adapter must be off in a's passes, reference included
    _click(a, 1)
    _click(b, 6)
    got = lora_state(pipe.unet, a.adapter)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    other = lora_state(pipe.unet, b.adapter)
    assert all(not torch.equal(got[k], other[k]) for k in got if "lora_B" in k)
    # each checkpoint on disk is its own session's LoRA
    assert all(torch.equal(v, a.folder.read_lora(a.head)[k]) for k, v in got.items())
    assert all(torch.equal(v, b.folder.read_lora(b.head)[k]) for k, v in other.items())
    a.close()
    assert list(pipe.unet.peft_config) == ["d3po_2"]       # a's adapter is gone, b's untouched
    assert all(torch.equal(v, lora_state(pipe.unet, b.adapter)[k]) for k, v in other.items())
    b.close()


def test_sessions_whose_loras_sit_on_different_modules_share_a_pipeline_bit_exactly(tmp_path):
    """An old session keeps the placement it was made with (lora_targets is fixed after its first
    update), so one process may hold a self-attention LoRA and a ResNet one on the same UNet: each
    session's LoRA trains exactly as it would alone, with the other's modules off in its passes."""
    placements = {"a": PLACEMENTS["attn1"], "b": PLACEMENTS["conv"]}
    expected = {}
    for name, targets in placements.items():
        alone = Session.open(tmp_path / f"alone-{name}", model="tiny", pipeline=tiny_pipeline("sd1"), **KW,
                             lora_targets=targets)
        for seed in (0, 1):
            _click(alone, seed)
        expected[name] = lora_state(alone.pipe.unet, alone.adapter)
        alone.close()
    pipe = tiny_pipeline("sd1")
    a, b = (Session.open(tmp_path / n, model="tiny", pipeline=pipe, **KW, lora_targets=t) for n, t in placements.items())
    assert a.pipe is b.pipe and a.adapter != b.adapter
    _click(a, 0)
    _click(b, 0)
    _click(b, 1)
    _click(a, 1)
    for name, s in (("a", a), ("b", b)):
        got = lora_state(pipe.unet, s.adapter)
        assert got.keys() == expected[name].keys() and all(torch.equal(expected[name][k], got[k]) for k in got)
        assert all(any(k.split(".lora_")[0].endswith(t) for t in placements[name]) for k in got)
    b.close()
    assert all(torch.equal(v, lora_state(pipe.unet, a.adapter)[k]) for k, v in expected["a"].items())
    a.close()


def test_the_reference_pass_switches_every_adapter_off(tiny_sd1):
    unet = tiny_sd1.unet
    base = _unet_out(unet)
    for name, seed in (("d3po", 0), ("d3po_2", 1)):
        with torch.no_grad():
            for p in add_lora(unet, 4, 4, ["to_q", "to_v"], seed, adapter=name):
                p.normal_()
    assert not torch.equal(_unet_out(unet), base)
    with lora_disabled(unet):
        assert torch.equal(_unet_out(unet), base)


def test_sessions_on_one_model_load_it_once_and_the_last_close_drops_it(tmp_path):
    a = Session.open(tmp_path / "a", model="embedded")
    b = Session.open(tmp_path / "b")                      # a new folder defaults to the embedded model
    assert a.pipe is b.pipe
    assert list(POOL.loaded().values()) == [2]
    a.close()
    assert list(POOL.loaded().values()) == [1]
    b.close()
    assert POOL.loaded() == {}


def test_a_pipeline_in_use_is_not_recast_for_another_dtype(tmp_path, tiny_sd1):
    a = Session.open(tmp_path / "a", model="tiny", pipeline=tiny_sd1, **KW)
    with pytest.raises(SessionError, match="close that session first"):
        Session.open(tmp_path / "b", model="tiny", pipeline=tiny_sd1, steps=3, dtype="bfloat16")
    assert tiny_sd1.unet.dtype == torch.float32
    Session.open(tmp_path / "c", model="tiny", pipeline=tiny_sd1, **KW).close()   # the lock was released
    a.close()


def test_pool_loads_once_per_key_and_names_the_lowest_free_adapter(tiny_sd1):
    pool, loads = ModelPool(), []

    def load():
        loads.append(1)
        add_lora(tiny_sd1.unet, 2, 2, ["to_q"], adapter="placeholder")   # release() needs peft layers
        return tiny_sd1

    s1, n1 = pool.acquire(("k",), load)
    s2, n2 = pool.acquire(("k",), load)
    assert s1 is s2 and len(loads) == 1 and (n1, n2) == ("d3po", "d3po_2")
    pool.release(s1, n1)
    assert pool.acquire(("k",), load)[1] == "d3po"
