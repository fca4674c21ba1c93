"""``drift_budget``: the anchor to the base. A click's step is cut so that the model's predictions
on its trajectory end no further than the budget (RMS) from the base's, LoRA off.

Pure: the projection onto the ball against hand numbers. In a session, on SD 1.x- and SDXL-shaped
tiny models: clicks that would carry the model past the budget stop at it (measured with the LoRA
switched off, as the anchor does), while the same clicks without the anchor go on.
"""
import pytest
import torch

from d3po_studio.core.lora import lora_disabled
from d3po_studio.core.trust_region import anchored_scale, plan_predictions, predictions, probe_steps, rms_change


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_anchored_scale_against_hand_numbers():
    # from the base, a unit-RMS change: the step stops at the budget
    assert anchored_scale(_t(0, 0), _t(1, 1), 0.5, 0.3) == pytest.approx(0.3)
    # inside the ball with room for the whole step: unchanged
    assert anchored_scale(_t(0.1, 0.1), _t(1, 1), 0.1, 0.3) == pytest.approx(0.1)
    # 0.2 out along the step's own direction: 0.1 of room left
    assert anchored_scale(_t(0.2, 0.2), _t(1, 1), 0.5, 0.3) == pytest.approx(0.1)
    # sideways from 0.2 (orthogonal, unit RMS): 0.2² + s² ≤ 0.3² up to s = √0.05; at the edge, none
    assert anchored_scale(_t(0.2 * 2 ** 0.5, 0), _t(0, 2 ** 0.5), 1.0, 0.3) == pytest.approx(0.05 ** 0.5)
    assert anchored_scale(_t(0.3 * 2 ** 0.5, 0), _t(0, 2 ** 0.5), 1.0, 0.3) == pytest.approx(0.0, abs=1e-6)
    # outside the ball (0.5 > 0.3): moving back in is allowed, up to where it started
    assert anchored_scale(_t(0.5, 0.5), _t(-1, -1), 0.4, 0.3) == pytest.approx(0.4)
    assert anchored_scale(_t(0.5, 0.5), _t(-1, -1), 2.0, 0.3) == pytest.approx(1.0)
    # … and moving further out is not
    assert anchored_scale(_t(0.5, 0.5), _t(1, 1), 0.4, 0.3) == 0.0
    # a step that changes nothing is left alone
    assert anchored_scale(_t(0.5, 0.5), _t(0, 0), 0.4, 0.3) == 0.4


def _drift(s, batch):
    """RMS of (predictions − the base's) on the batch's trajectory, at the trust region's probes."""
    probes = probe_steps(len(batch.trajectory.timesteps))
    now = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
    with lora_disabled(s.pipe.unet):
        base = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
    return rms_change(base, now)


@pytest.mark.parametrize("family, rho", [("sd1", 0.02), ("sdxl", 0.02), ("sd1", None)])
def test_clicks_stop_at_the_budget(tmp_path, family, rho):
    """With the trust region's steps of ρ, and (ρ None) with the optimizer's own steps, of lr 3e-3
    (on the tiny SD1's ResNet LoRA, the default placement, 3e-2 moved the predictions past the
    budget in the first click, which the anchor cut by two thirds; on its self-attention LoRA 1e-2
    had moved them by < 0.05 in five clicks)."""
    from d3po_studio import Session
    from d3po_studio.core.tiny import tiny_pipeline
    pipe, budget = tiny_pipeline(family), 0.05
    drifts = {}
    for name, anchor in (("free", None), ("anchored", budget)):
        with Session.open(tmp_path / name, model=f"tiny-{family}", pipeline=pipe, steps=4, dtype="float32",
                          optimizer="adamw", step_rms=rho, drift_budget=anchor, train_fraction=1.0,
                          step_evidence=False, logprob_grid=0, lr=1e-2 if rho else 3e-3) as s:
            reports = []
            for _ in range(5):            # the same noise and the same choice: one direction, 5 × ρ
                batch = s.sample("a red circle", n=2, seed=0)
                reports.append(s.prefer(batch, best=1))
            drifts[name] = _drift(s, batch)
    if anchor is not None:
        assert reports[0]["anchor_cut"] == 0.0 and reports[0]["drift_rms"] == pytest.approx(0.0, abs=1e-6)
        assert reports[-1]["anchor_cut"] > 0.5        # the last clicks were cut
    assert drifts["free"] > 1.5 * budget, drifts       # without the anchor the clicks carry on
    assert drifts["anchored"] == pytest.approx(budget, rel=0.15)


def test_a_budget_never_reached_changes_nothing(tmp_path, tiny_sd1):
    """Below the budget the anchored session trains bit for bit as the free one (so a control run
    that never reached the budget stands for both)."""
    from d3po_studio import Session
    trained = []
    for name, anchor in (("free", None), ("far", 10.0)):
        with Session.open(tmp_path / name, model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                          optimizer="adamw", step_rms=0.02, drift_budget=anchor, step_evidence=True,
                          evidence_z=0.0, logprob_grid=0) as s:
            start = [p.detach().clone() for p in s.params]
            for seed, best in ((0, 1), (1, 0), (0, 1)):
                s.prefer(s.sample("a red circle", n=2, seed=seed), best=best)
            trained.append([p.detach().clone() for p in s.params])
            assert not all(torch.equal(a, b) for a, b in zip(start, trained[-1]))    # the clicks moved it
    assert all(torch.equal(a, b) for a, b in zip(*trained))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_anchor_clicks_bound_the_earlier_prompts_too(tmp_path, family):
    """Clicks on a second prompt, after the first has reached the budget: with anchor_clicks the
    first prompt's drift stays at the budget at the steps where it is probed (three here, as the
    click's own images are; the default's one, the middle step, drifted only 0.02 on this tiny
    model where the three drifted past 0.065); with the click's own images only, it passes it."""
    from d3po_studio import Session
    from d3po_studio.core.tiny import tiny_pipeline
    pipe, budget = tiny_pipeline(family), 0.05
    drifts, reports = {}, {}
    for name, k in (("own", 0), ("earlier", 10)):
        with Session.open(tmp_path / name, model=f"tiny-{family}", pipeline=pipe, steps=4, dtype="float32",
                          optimizer="adamw", step_rms=0.02, drift_budget=budget, anchor_clicks=k,
                          anchor_probes=3, step_evidence=False, logprob_grid=0) as s:
            for _ in range(4):                   # the first prompt, up to the budget
                first = s.sample("a red circle", n=2, seed=0)
                s.prefer(first, best=1)
            for seed in range(6):                # then another prompt, far from the budget itself
                reports[name] = s.prefer(s.sample("a blue square", n=2, seed=100 + seed), best=seed % 2)
            drifts[name] = _drift(s, first)
    assert drifts["own"] > 1.3 * budget
    assert drifts["earlier"] == pytest.approx(budget, rel=0.15)
    assert reports["earlier"]["drift_rms_earlier"] > 0 and "drift_rms_earlier" not in reports["own"]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_batched_probes_are_each_probe_forwarded_alone(family):
    """Probes run in batches of images from different prompts, steps (timesteps) and, on SDXL,
    their own pooled embeddings and size ids: the earlier clicks' probes, and a click's own probes at
    its steps. Each must get what it gets forwarded alone."""
    from d3po_studio.core.sampling import predict_noise, sample_trajectory
    from d3po_studio.core.tiny import tiny_pipeline
    from d3po_studio.core.trust_region import Anchor, anchor_predictions, probe_plan
    pipe = tiny_pipeline(family)            # (no LoRA: the base is not needed here)
    torch.manual_seed(0)
    for module in pipe.unet.modules():           # a non-zero model, so that every input matters
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.normal_(module.weight, std=0.05)

    def alone(trajectory, k, images):
        return torch.cat([predict_noise(pipe.unet, trajectory.latents[k, [i]].float(), int(trajectory.timesteps[k]),
                                        trajectory.cond, 3.0) for i in images])

    # float32 sums in another order: up to 1.4e-5 apart on values of ~2 on some CPUs' kernels
    def same(a, b):
        return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=5e-5)
    anchors = []
    for seed, (prompt, size) in enumerate([("a red circle", 16), ("a blue square", 16), ("green", 24)] * 2):
        traj = sample_trajectory(pipe, prompt, "", 2, seed, steps=4, guidance=3.0, eta=1.0, height=size,
                                 width=size, device="cpu")
        anchors.append(Anchor(traj, [seed % 2], probe_steps(4), []))
    batched = anchor_predictions(pipe, anchors, 3.0, "cpu", batch=4)
    for anchor, got in zip(anchors, batched):
        assert len(got) == len(anchor.steps)
        assert all(same(g, alone(anchor.trajectory, k, anchor.images)) for g, k in zip(got, anchor.steps))
    assert not torch.allclose(batched[0][1], batched[1][1], atol=1e-3)    # the prompts do differ
    traj = anchors[0].trajectory
    for plan in (probe_plan(probe_steps(4), [0, 1], 1), probe_plan(probe_steps(4), [0, 1])):
        got = plan_predictions(pipe, traj, plan, 3.0, "cpu")
        assert len(got) == len(plan) and all(same(g, alone(traj, k, images)) for g, (k, images) in zip(got, plan))
    assert not torch.allclose(got[0], got[1], atol=1e-3)                  # the steps do differ


def test_each_earlier_click_is_measured_once(tmp_path, tiny_sd1, monkeypatch):
    """The base's predictions at an earlier winner never change: a session measures them when the
    click first becomes an anchor and keeps them while it is one of the last K."""
    from d3po_studio import Session
    from d3po_studio.core import trust_region
    measured = []
    real = trust_region.Anchor.measure.__func__
    monkeypatch.setattr(trust_region.Anchor, "measure",
                        classmethod(lambda cls, *a, **k: measured.append(a[1]) or real(cls, *a, **k)))
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      optimizer="adamw", step_rms=0.02, drift_budget=0.05, anchor_clicks=2,
                      step_evidence=False, logprob_grid=0) as s:
        for seed in range(5):
            report = s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)
    assert len(measured) == 4               # clicks 1–4 each became an anchor once (click 5 never did)
    assert len({id(t) for t in measured}) == 4
    assert "drift_rms_earlier" in report


@pytest.mark.parametrize("backward, dtype", [("joint", "float32"), ("split", "float32"), ("joint", "bfloat16")])
def test_the_trust_region_reuses_the_objectives_passes_exactly(tmp_path, tiny_sd1, backward, dtype):
    """The predictions before a step and the base's, at the probes, are the ones the D3PO passes
    already made: a click that steps lands bit for bit where it lands when the trust region runs
    them itself, with two sets of probe forwards fewer; a click without evidence runs none. (The
    policy pass of the joint backward has a graph and checkpoints its activations; its forward is
    still the same computation, also in bfloat16 on this CPU. With ``probe_images`` the trust region
    takes its images out of the passes' batch, where run again it forwards them alone, a batch whose
    rounding may differ: so every image here.)"""
    from unittest import mock

    from d3po_studio import Session
    from d3po_studio.core import objectives, trust_region
    real = objectives.OBJECTIVES["d3po"]
    results = {}
    for name, objective in (("reused", real), ("run again", lambda *a, seen=None, **k: real(*a, **k))):
        calls = []

        def counted(pipe, trajectory, plan, *a, **k):
            if len(plan[0][1]) == 2:   # the click's own probes (an earlier winner is measured on its one image)
                calls.append(plan)
            return plan_predictions(pipe, trajectory, plan, *a, **k)
        with mock.patch.dict(objectives.OBJECTIVES, {"d3po": objective}), \
                mock.patch.object(trust_region, "plan_predictions", counted), \
                Session.open(tmp_path / name, model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype=dtype,
                             step_rms=0.01, drift_budget=0.05, backward=backward, evidence_z=0.0,
                             probe_images=0) as s:
            first = s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
            assert first["evidence_scale"] == 0.0 and first["step_scale"] == 0.0 and calls == []
            u = s._train.evidence.total.clone()       # the same batch again, with evidence: it steps
            s._train.evidence.total, s._train.evidence.count = 3 * u, 3
            report = s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
            results[name] = (report, [p.detach().clone() for p in s.params], len(calls))
    (reused, lora, n_reused), (again, lora_again, n_again) = results["reused"], results["run again"]
    measured = {"seconds", "peak_memory_bytes", "added_memory_bytes"}     # of the machine, not the click
    assert reused["step_scale"] > 0
    assert {k: v for k, v in reused.items() if k not in measured} == {k: v for k, v in again.items() if k not in measured}
    assert all(torch.equal(p, q) for p, q in zip(lora, lora_again))
    assert n_again == n_reused + 2 and n_reused in (1, 2, 3)     # after the step, and at 0–2 more scales


def test_anchor_probes_sets_how_many_steps_of_each_earlier_winner_are_measured(tmp_path, tiny_sd1):
    """anchor_probes=1 (the default): each earlier winner is probed at its trajectory's middle step
    only, the middle one of the three that sessions before the twenty-third probed; the click's
    report has the earlier winners' drift measured there."""
    from d3po_studio import Session
    assert probe_steps(10, 1) == [4] and probe_steps(10) == [0, 4, 9] and probe_steps(1, 1) == [0]
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=5, dtype="float32",
                      optimizer="adamw", step_rms=0.02, drift_budget=0.05, anchor_clicks=2, anchor_probes=1,
                      step_evidence=False, logprob_grid=0) as s:
        for seed in range(3):
            report = s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)
        assert [a.steps for a in s._anchors.values()] == [[2], [2]] and "drift_rms_earlier" in report


def test_anchor_stride_checks_every_gth_earlier_winner_newest_first(tmp_path, tiny_sd1):
    """anchor_stride=G: a click measures every G-th of the last K winners, counting from the newest,
    so as the window slides each winner is checked on every G-th click; 1 checks them all."""
    from d3po_studio import Session
    from d3po_studio.core import trust_region
    seen = []
    real = trust_region.anchor_predictions

    def counted(pipe, anchors, *a, **k):
        seen.append([id(anchor) for anchor in anchors])
        return real(pipe, anchors, *a, **k)
    from unittest import mock
    with mock.patch.object(trust_region, "anchor_predictions", counted), \
            Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                         optimizer="adamw", step_rms=0.02, drift_budget=0.05, anchor_clicks=4, anchor_stride=2,
                         step_evidence=False, logprob_grid=0) as s:
        for seed in range(6):
            seen.clear()
            s.prefer(s.sample("a red circle", n=2, seed=seed), best=seed % 2)
            window = [id(anchor) for anchor in s._anchors.values()]
            if seed >= 1:         # the anchors the click handed the trust region: newest first, every other
                assert seen and seen[0] == window[::2], (seed, seen, window)
