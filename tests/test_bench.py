"""Benchmarks: the split-gradient update equals the joint one; each benchmark's smoke run
writes its rows (into a temporary markdown file, never docs/benchmarks.md)."""
import pytest
import torch

from d3po_studio.bench import estimate, latency, memory, placement_cost, precision, report, update_cost
from d3po_studio.bench.placement import PLACEMENTS
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


@pytest.mark.parametrize("pairs, guidance, ratio_clip, part", [
    ([(1, 0)], 4.0, None, "whole"),                  # one pair, CFG in the update
    ([(0, 1), (0, 2), (1, 2)], 1.0, 0.1, "whole"),   # a ranking (image 1 wins and loses), official clamp (active at step 0)
    ([(2, 0), (2, 1)], 4.0, None, "choice"),         # best of 3, the choice's part of the gradient only
])
def test_split_gradients_equal_joint(tiny_sd1, pairs, guidance, ratio_clip, part):
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
              ratio_clip=ratio_clip, device=torch.device("cpu"), weight=0.7, part=part)
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


def test_placement_cost_times_a_session_at_its_placement_and_takes_ratios_within_rounds(tmp_path):
    child = placement_cost.run_child("tiny", "conv", clicks=1)
    assert child["trainable_parameters"] > 0 and child["median"]["update"] > 0 and child["median"]["floor"] > 0
    session = latency.open_session("tiny", tmp_path / "s", lora_targets=["conv1", "conv2"])
    try:
        assert child["trainable_parameters"] == sum(p.numel() for p in session.params)
        assert session.settings.lora_targets == ("conv1", "conv2")
    finally:
        session.close()
    timed = lambda u, f: {"median": {"update": u, "floor": f}, "trainable_parameters": 1}  # noqa: E731
    rounds = [{"attn1": timed(2.0, 1.0), "conv": timed(3.0, 1.2)}, {"attn1": timed(4.0, 2.0), "conv": timed(4.4, 2.6)},
              {"attn1": timed(1.0, 1.0), "conv": timed(1.2, 1.1)}]
    assert placement_cost.ratios(rounds, "update") == {"attn1": 1.0, "conv": pytest.approx(1.2)}
    assert placement_cost.ratios(rounds, "floor") == {"attn1": 1.0, "conv": pytest.approx(1.2)}
    text = placement_cost.markdown(rounds, "tiny", 1, "cmd")
    assert "conv1, conv2" in text and "| 1 | 3.00 | 1.20× | 1.20 | 1.20× |" in text
    assert placement_cost.targets("conv+attn1") == ("conv1", "conv2", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                                                    "attn1.to_out.0")
    with pytest.raises(SystemExit):     # argparse: an unknown placement is refused by name
        placement_cost.main(["--placements", "conv+attnx", "--no-docs"])


def test_update_cost_times_each_variant_on_the_same_clicks_and_splits_stepping_ones(tmp_path):
    variants = {"filed": update_cost.FILED, "default": {}}
    sessions = update_cost.open_sessions("tiny", variants, tmp_path)
    try:
        assert sessions["filed"].settings.step_evidence is False and sessions["default"].settings.step_evidence
        assert sessions["filed"].pipe is sessions["default"].pipe          # one loaded model
        rows = update_cost.measure(sessions, clicks=2, n=2)
    finally:
        for session in sessions.values():
            session.close()
    assert [row["click"] for row in rows] == [1, 2] and all(row["filed"]["stepped"] for row in rows)
    assert rows[0]["default"]["stepped"] is False       # one click cannot agree with anything
    assert all(row[name]["seconds"] > 0 for row in rows for name in variants)
    timed = lambda s, stepped: {"seconds": s, "stepped": stepped}   # noqa: E731
    rows = [{"click": 1, "filed": timed(2.0, True), "default": timed(2.2, False)},    # warm-up: not counted
            {"click": 3, "filed": timed(2.0, True), "default": timed(3.0, True)},
            {"click": 4, "filed": timed(4.0, True), "default": timed(5.0, True)}]
    rows.insert(1, {"click": 2, "filed": timed(2.0, True), "default": timed(2.4, False)})
    assert update_cost.ratios(rows, "default", "filed", 3) == {"stepped": [1.5, 1.25], "no step": [pytest.approx(1.2)]}
    assert update_cost.ratios(rows, "default", "filed", 4) == {"stepped": [1.25], "no step": [pytest.approx(1.2)]}
    text = update_cost.markdown(rows, variants, "filed", 3, 2, "bfloat16", "cmd")
    assert "| default | today's defaults | 4.00 | 1.38× (1.25–1.50, 2 clicks) | 1.20× (1.20–1.20, 1 click) |" in text
    assert "`lora_targets=to_q,to_k,to_v,to_out.0`" in text


def test_precision_sees_bfloat16s_rounding_floor_and_float32s_proportional_change(tmp_path):
    # the trust region's probes in float32 move with the step; in bfloat16 a tiny move already
    # changes the predictions by its rounding (the floor that docs/algorithm.md describes)
    # on the self-attention LoRA: on this tiny shape the default ResNet LoRA's bf16 clicks overshoot
    # (docs/algorithm.md; tests/test_objectives.py checks the default's landing on the embedded model)
    precision.main(["--model", "tiny", "--dtypes", "float32", "bfloat16", "--doc", str(tmp_path / "b.md"),
                    "--clicks", "1", "--lora-targets", ",".join(PLACEMENTS["attn1"])])
    section = report.read_section("precision", tmp_path / "b.md")
    assert "on attn1.to_q, attn1.to_k, attn1.to_v, attn1.to_out.0 with random weights" in section
    rows = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [float(x) for x in line.strip("|").split("|")[2:]]
            for line in section.splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")}
    f32, bf16 = rows[("float32", "guided (6)")], rows[("bfloat16", "guided (6)")]
    for small, large in zip(f32[1:], f32[2:]):    # scales 1e-3 ... 1, each 10× the one before
        assert 5 < large / small < 20             # (at 1e-4, float32's own rounding, ~1e-6 here)
    assert bf16[0] > 100 * f32[0]                  # at s = 1e-4: rounding, not the move
    assert bf16[0] > 0.1 * bf16[-2]                # and about the same as at 1000× the move
    # the trust region's landing: one click's true change ÷ ρ, per dtype (0.87–0.96 in bf16 on this shape)
    landed = {line.strip("|").split("|")[0].strip(): float(line.strip("|").split("|")[-1])
              for line in section.split("landing")[1].splitlines() if line.startswith("| float32") or line.startswith("| bfloat16")}
    assert landed["float32"] == pytest.approx(1.0, abs=0.05) and landed["bfloat16"] == pytest.approx(1.0, abs=0.35)


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


# ------------------------------------------------------------------ bench/expressible.py (RAFT upper bound)
def test_denoising_loss_is_the_epsilon_mse_of_the_conditional_prediction(tiny_session):
    from d3po_studio.bench.expressible import denoising_loss
    from d3po_studio.core.sampling import make_scheduler, predict_noise
    batch = tiny_session.sample("a red circle", n=2, seed=3)
    pipe = tiny_session.pipe
    scheduler = make_scheduler(pipe, 4)
    x0 = batch.trajectory.latents[-1, :1].float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = 500
    a = scheduler.alphas_cumprod[t].float()
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        expected = ((predict_noise(pipe.unet, x_t, t, batch.trajectory.cond, 1.0) - noise) ** 2).mean()
        got = denoising_loss(pipe.unet, x0, batch.trajectory.cond, t, noise, scheduler)
    assert torch.allclose(got, expected, rtol=1e-5)


def test_raft_round_fits_the_choosers_best_image(tiny_session):
    """The kept image is the chooser's best, and the LoRA's steps lower its denoising loss."""
    from d3po_studio.bench.expressible import denoising_loss, raft_round
    from d3po_studio.core.lora import activate
    from d3po_studio.core.sampling import make_scheduler
    chooser = lambda images, prompt: [0.0, 0.0, 1.0, 0.0]     # noqa: E731 — always the third
    optimizer = torch.optim.AdamW(tiny_session.params, lr=1e-2, weight_decay=0.0)
    before = [p.detach().clone() for p in tiny_session.params]
    generator = torch.Generator().manual_seed(0)
    record = raft_round(tiny_session, chooser, "a red circle", 7, 4, optimizer, 6, generator)
    assert record["best"] == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, tiny_session.params))
    # the same image (same seed) scored at fixed timesteps and noise: lower with the fitted LoRA
    batch = tiny_session.sample("a red circle", n=4, seed=7)
    pipe = tiny_session.pipe
    activate(pipe.unet, tiny_session.adapter, tiny_session.params)
    scheduler = make_scheduler(pipe, 4)
    noise = torch.randn((1, *batch.trajectory.latents.shape[2:]), generator=torch.Generator().manual_seed(1))
    def loss_at(x0):
        with torch.no_grad():
            return sum(float(denoising_loss(pipe.unet, x0, batch.trajectory.cond, t, noise, scheduler))
                       for t in (100, 400, 700))
    from d3po_studio.core.lora import lora_disabled
    fitted = loss_at(batch.trajectory.latents[-1, 2:3].float())
    with lora_disabled(pipe.unet):
        base = loss_at(batch.trajectory.latents[-1, 2:3].float())
    assert fitted < base


def test_expressible_cell_writes_a_report_the_tables_read(tmp_path):
    from d3po_studio.bench import expressible
    cell = {"variant": "raft-test", "chooser": "larger-shape", "seed": 0, "k": 2, "sft_steps": 1, "lr": 1e-3,
            "rounds": 2, "eval_pairs": 2, "out": str(tmp_path / "cell")}
    report_ = expressible.run_cell(cell)
    assert [c["clicks"] for c in report_["checkpoints"]] == [2]
    assert set(report_["checkpoints"][0]["oracles"]) >= {"larger-shape", "random"}
    text = expressible.markdown([report_, {**report_, "oracle": "random"}], "test", 2, 2)
    assert "| raft-test | larger-shape | pairs | 1 |" in text
    assert "| raft-test | pairs | 1 | 2 |" in text


def test_world_batch_encodes_the_renderers_images_of_the_prompt(tiny_session):
    """--source world: the renderer's images of the prompt (the checker reads them right), encoded
    by the VAE; a round keeps the chooser's best of them."""
    import random
    from d3po_studio.bench.expressible import raft_round, world_batch
    from d3po_studio.core.embedded.checker import fidelity
    from d3po_studio.core.embedded.world import render_prompt
    from d3po_studio.core.oracles import get_oracle
    pipe = tiny_session.pipe
    images, latents, cond = world_batch(pipe, "a large red circle", 5, 3, tiny_session.runtime.device)
    rng = random.Random(5)
    assert [i.tobytes() for i in images] == [render_prompt("a large red circle", rng).tobytes() for _ in range(3)]
    assert fidelity(images, ["a large red circle"] * 3)["both"] == 1.0
    assert latents.shape[:2] == (3, pipe.unet.config.in_channels) and torch.isfinite(latents).all()
    assert cond["prompt_embeds"].shape[0] == 1
    scores = get_oracle("larger-shape")(images, "a large red circle")
    optimizer = torch.optim.AdamW(tiny_session.params, lr=1e-3)
    record = raft_round(tiny_session, get_oracle("larger-shape"), "a large red circle", 5, 3, optimizer, 1,
                        torch.Generator().manual_seed(0), source="world")
    assert record["best"] == max(range(3), key=scores.__getitem__)


def test_parse_value_reads_settings_from_the_command_line():
    from d3po_studio.bench.learning import parse_value
    assert parse_value("null") is None and parse_value("true") is True and parse_value("none") == "none"
    assert parse_value("8") == 8 and parse_value("0.07") == 0.07
    assert parse_value("to_q,to_v,conv1") == ("to_q", "to_v", "conv1")    # lora_targets
    from d3po_studio.bench.learning import format_value
    assert format_value(parse_value("to_q,to_v,conv1")) == "to_q,to_v,conv1"


def test_learning_devices_compares_the_cells_both_devices_ran(tmp_path):
    """A real cell (two clicks on the embedded model) read from report.json on one side and
    from a stopped cell's partial.json on the other; only the cells and evaluations both have."""
    import json
    import shutil

    from d3po_studio.bench import learning, learning_devices
    a, b = tmp_path / "gpu", tmp_path / "cpu"
    cell = {"variant": "v", "settings": {"steps": 2}, "chooser": "brighter", "n": 2, "seed": 0, "clicks": 2,
            "eval_pairs": 2, "out": str(a / "v__brighter__n2__s0")}
    learning.run_cell(cell)
    report = json.loads((a / "v__brighter__n2__s0" / "report.json").read_text())
    (b / "v__brighter__n2__s0").mkdir(parents=True)
    (b / "v__brighter__n2__s0" / "partial.json").write_text(json.dumps(report))
    shutil.copytree(a / "v__brighter__n2__s0", a / "v__random__n2__s0")     # only on one side
    rows = learning_devices.compare(learning_devices.load_cells(a), learning_devices.load_cells(b))
    assert [(r["cell"], r["score"]) for r in rows] == [("v__brighter__n2__s0", "brighter")]
    assert rows[0]["a"] == rows[0]["b"] and rows[0]["clicks"] == report["checkpoints"][-1]["clicks"]
    doc = tmp_path / "bench.md"
    learning_devices.main(["--cells", str(a), "gpu", "--cells", str(b), "cpu", "--docs", str(doc)])
    text = doc.read_text()
    assert "bench:learning_devices:start" in text and "| v__brighter__n2__s0 | brighter |" in text
    assert "+0.00 |" in text and "purposeful choosers mean 0.00" in text


def test_agreement_reads_each_clicks_evidence_statistics(tmp_path):
    """A real cell (three clicks on the embedded model): every click records P = |Σu|²/k and its
    null spread; the first click's P is exactly 1 with no spread, and the table shows both."""
    import json

    from d3po_studio.bench import agreement, learning
    cell = {"variant": "v", "settings": {"steps": 2}, "chooser": "brighter", "n": 2, "seed": 0, "clicks": 3,
            "eval_pairs": 2, "out": str(tmp_path / "v__brighter__n2__s0")}
    learning.run_cell(cell)
    stats = agreement.cell_statistics(tmp_path / "v__brighter__n2__s0")
    assert sorted(stats) == [1, 2, 3]
    assert stats[1] == {"power": pytest.approx(1.0, abs=1e-4), "null_sd": 0.0}
    assert stats[3]["null_sd"] > 0 and stats[3]["power"] >= 0
    z = (stats[3]["power"] - 1) / stats[3]["null_sd"]
    doc = tmp_path / "bench.md"
    agreement.main(["--workdir", str(tmp_path), "--variants", "v", "--at", "1", "3", "--docs", str(doc)])
    text = doc.read_text()
    assert "bench:learning_agreement:start" in text and "| v | brighter | pairs | 1 | 1.00 / 0.00 / +0.0 / inf |" in text
    assert f"/ {z:+.1f} /" in text
    round_json = next((tmp_path / "v__brighter__n2__s0" / "session" / "rounds").glob("*/round.json"))
    assert "evidence_power" in json.loads(round_json.read_text())["report"]


def test_pull_projects_each_click_on_the_sum_before_it_split_by_recent_steps(tmp_path):
    """cell_pull reads the newest checkpoint's sketches and each round's step_scale: a click within
    PULL_AFTER clicks of a step counts as "after a step", and its value is u_n·S/|S| by hand."""
    import json

    from safetensors.torch import save_file

    from d3po_studio.bench import agreement
    session = tmp_path / "v__random__n4__s0" / "session"
    e1, e2 = torch.eye(4)[0], torch.eye(4)[1]
    sketches = torch.stack([e1, e1, -e1, e2, e1, e2])
    steps = [0.0, 0.5, 0.0, 0.0, 0.0, 0.0]          # a step at the second click only
    (session / "checkpoints" / "000006").mkdir(parents=True)
    save_file({"sketches": sketches.half()}, str(session / "checkpoints" / "000006" / "evidence.safetensors"))
    (session / "checkpoints" / "000006" / "meta.json").write_text(json.dumps({"updates": 6}))    # a whole checkpoint
    (session / "HEAD").write_text(json.dumps({"checkpoint": "000006"}))
    for i, step in enumerate(steps):
        (session / "rounds" / f"{i:06d}").mkdir(parents=True)
        report = {"evidence_power": 1.0, "evidence_null_sd": 0.1, "step_scale": step}
        (session / "rounds" / f"{i:06d}" / "round.json").write_text(json.dumps({"report": report}))
    near, far = agreement.cell_pull(session.parent)
    # clicks 3-5 come within 3 clicks of the step: S = 2e1 → −1; S = e1 → 0; S = e1+e2 → 1/√2
    assert near == pytest.approx([-1.0, 0.0, 2 ** -0.5], abs=1e-3)
    # click 2 (S = e1: +1) and click 6 (its last 3 clicks took no step; S = 2e1+e2 → 1/√5)
    assert far == pytest.approx([1.0, 5 ** -0.5], abs=1e-3)
    row = agreement.rows(tmp_path, ["v"], at=(6,))[0]
    assert row[-1] == f"{(-1 + 2 ** -0.5) / 3:+.3f} (3) / {(1 + 5 ** -0.5) / 2:+.3f} (2)"
