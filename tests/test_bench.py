"""Benchmarks: the split-gradient update equals the joint one; each benchmark's smoke run
writes its rows (into a temporary markdown file, never docs/benchmarks.md)."""
import pytest
import torch

from d3po_studio.bench import estimate, latency, memory, report
from d3po_studio.core.lora import add_lora
from d3po_studio.core.sampling import sample_trajectory
from d3po_studio.core.split import accumulate_d3po_gradients_split
from d3po_studio.core.update import accumulate_d3po_gradients


# ------------------------------------------------------------------ report.write_section
def test_write_section_replaces_only_its_block(tmp_path):
    doc = tmp_path / "benchmarks.md"
    report.write_section("memory", "old memory", doc)            # creates the file
    report.write_section("learning", "the learning benchmark", doc)
    report.write_section("memory", "| new | table |", doc)
    text = doc.read_text()
    assert "old memory" not in text and text.count("<!-- bench:memory:start -->") == 1
    assert report.read_section("memory", doc) == "| new | table |"
    assert report.read_section("learning", doc) == "the learning benchmark"
    assert text.index("bench:memory:start") < text.index("bench:learning:start")   # order kept
    doc.write_text(text + "\n<!-- bench:memory:start -->\nx\n<!-- bench:memory:end -->\n")
    with pytest.raises(ValueError, match="more than once"):
        report.write_section("memory", "y", doc)


# ------------------------------------------------------------------ split == joint
def _lora_gradients(pipe, fn, trajectory, pairs, **kw):
    params = [p for n, p in pipe.unet.named_parameters() if "lora_" in n]
    for p in params:
        p.grad = None
    metrics = fn(pipe, trajectory, pairs, **kw)
    return metrics, torch.cat([p.grad.flatten() for p in params])


@pytest.mark.parametrize("pairs, guidance, ratio_clip", [
    ([(1, 0)], 4.0, None),                  # one pair, CFG in the update
    ([(0, 1), (0, 2), (1, 2)], 1.0, 0.1),   # a ranking (image 1 wins and loses), official clamp (active at step 0)
])
def test_split_gradients_equal_joint(tiny_sd1, pairs, guidance, ratio_clip):
    pipe = tiny_sd1
    params = add_lora(pipe.unet, 4, 4.0, ("to_q", "to_k", "to_v", "to_out.0"))
    pipe.unet.to(torch.float64)    # float64: the two must agree to rounding (in float32: ~1e-5 relative)
    with torch.no_grad():                     # move off B = 0, so policy ≠ reference and A has gradients
        g = torch.Generator().manual_seed(1)
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    traj = sample_trajectory(pipe, "a red circle", "", 3, seed=3, steps=4, guidance=4.0, eta=1.0,
                             height=16, width=16)
    kw = dict(steps=[0, 3], beta=0.1, guidance=guidance, eta=1.0, reduction="sum",
              ratio_clip=ratio_clip, device=torch.device("cpu"), weight=0.7)
    m_joint, g_joint = _lora_gradients(pipe, accumulate_d3po_gradients, traj, pairs, **kw)
    m_split, g_split = _lora_gradients(pipe, accumulate_d3po_gradients_split, traj, pairs, **kw)
    assert g_joint.norm() > 0
    # tolerance: 1e-9 of the gradient norm (measured: ~1e-14 in float64); they differ only in
    # batch composition and summation order
    assert (g_split - g_joint).norm() <= 1e-9 * g_joint.norm()
    assert m_split == pytest.approx(m_joint, rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ memory + estimate smoke
def test_memory_and_estimate_write_their_rows(tmp_path):
    rows = [memory.measure("tiny-sd1", 16, name, kept_steps=1)
            for name in ("official", "ours", "ours-copy-reference", "ours-split")]
    for r in rows:
        assert r["peak_bytes"] >= r["setup_bytes"] > 0 and len(r["step_seconds"]) == 1
        assert r["grad_norm"] > 0 and r["lora_parameters"] > 0
    # one configuration through the real child process, as the full run does
    rows += memory.run_plan({"tiny-sdxl:16": ["ours"]}, kept_steps=1, log=lambda _: None)
    assert "error" not in rows[-1] and rows[-1]["family"] == "tiny-sdxl"
    doc = tmp_path / "benchmarks.md"
    report.write_section("memory", memory.markdown(rows, "test"), doc)
    section = report.read_section("memory", doc)
    assert "### tiny-sd1 at 16×16 px" in section and "### tiny-sdxl at 16×16 px" in section
    assert "| official |" in section and "| ours-split |" in section and "ours / official peak" in section
    # the estimate scales these (relabelled) rows to SD 1.5 at 512 px
    estimate.write_estimate([{**r, "family": "sd1"} for r in rows[:4]], doc)
    est = report.read_section("estimate", doc)
    assert "sd1 at 512×512 px" in est and "| **total (torch allocated)** |" in est
    assert "UNet fp16" in est and report.read_section("memory", doc) == section


# ------------------------------------------------------------------ latency smoke
def test_latency_writes_its_rows(tmp_path):
    # the tiny pipeline: a smoke run in seconds (the embedded model takes minutes on a loaded machine)
    session = latency.open_session("tiny", tmp_path / "session")
    try:
        result = latency.measure(session, clicks=1, warmup=0)
    finally:
        session.close()
    m = result["median"]
    assert 0 < m["floor"] and 0 < m["update"] <= m["prefer"] < m["click_to_next"]
    doc = tmp_path / "benchmarks.md"
    report.write_section("latency", latency.markdown(result, "test"), doc)
    section = report.read_section("latency", doc)
    assert "click → next pair" in section and "update ÷ floor" in section


def test_learning_control_row_marks_a_chooser_the_cell_did_not_score():
    """A cell run before a chooser existed shows "—" in its column, never a made-up number."""
    from d3po_studio.bench.learning import CHOOSERS, CONTROL, control_rows
    scored = {name: {"win_rate": 0.1, "effect_size": 0.05} for name in CHOOSERS if name != "warmer"}
    report = {"variant": "default", "oracle": CONTROL, "n": 4, "runtime": {"device": "cpu", "dtype": "float32"},
              "checkpoints": [{"clicks": 50, "oracles": scored, "fidelity_vs_base": 1.0}]}
    row = control_rows([report])[0].split(" | ")
    column = 4 + CHOOSERS.index("warmer")
    assert row[column] == "—"
    assert row[4] == "10% / +0.05"
