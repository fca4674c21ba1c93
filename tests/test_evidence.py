"""``step_evidence``: each click steps along the clicks' summed unit gradients, by ρ times the
James–Stein evidence that they agree.

Pure: the factor against hand numbers (agreeing, opposite and orthogonal clicks), random-sign
clicks near 0 and consistent ones near 1. In a session: the first click does not move the LoRA,
a later click moves the predictions by ρ × the factor, and the evidence is checkpointed with the
LoRA (reopen, undo, a rolled-back update). The null spread √V of ``evidence_z``: the sketches'
estimate against the exact formula and that against random sign flips; z shuts chance agreement
of few directions and keeps a chooser's; in a session, the factor uses the session's own spread.
"""
from unittest import mock

import pytest
import torch

from d3po_studio.core.trust_region import (Evidence, add_click, evidence_scale, null_sd, predictions,
                                           probe_steps, rms_change, unit_gradient)


def _after(units):
    e = Evidence()
    for u in units:
        e = add_click(e, u)
    return e


def _joint(session) -> Evidence:
    """A session's evidence as its update reads it: its parts (the default LoRA has two, the
    convolutions and self-attention) as one unit vector a click (``joint_evidence``)."""
    from d3po_studio.core.lora import group_by_targets
    from d3po_studio.core.trust_region import joint_evidence
    parts = session.settings.resolved_parts
    sizes = group_by_targets(session.pipe.unet, session.params, parts)[1] if len(parts) > 1 else [0]
    return joint_evidence(session._train.evidence, sizes)


def test_evidence_scale_against_hand_numbers():
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert evidence_scale(Evidence()) == 0.0
    assert evidence_scale(_after([u])) == 0.0                       # one click proves nothing
    assert evidence_scale(_after([u, u, u, u])) == pytest.approx(1 - 4 / 16)
    assert evidence_scale(_after([u, v])) == 0.0                    # |Σu|² = 2 = k
    assert evidence_scale(_after([u, -u, u])) == 0.0                # |Σu|² = 1 < 3
    assert _after([u, None, u]).count == 2                          # a click without gradient adds nothing
    with pytest.raises(ValueError, match="evidence of 2 values"):
        add_click(_after([u]), torch.ones(3) / 3 ** 0.5)


def test_random_clicks_give_no_evidence_and_a_consistent_chooser_does():
    g = torch.Generator().manual_seed(0)
    dim, clicks = 400, 50
    common = torch.randn(dim, generator=g)
    common /= common.norm()
    random_scales, chooser_scales = [], []
    for trial in range(20):
        noise = [torch.randn(dim, generator=g) for _ in range(clicks)]
        signs = torch.randint(0, 2, (clicks,), generator=g) * 2 - 1
        # random clicks: the click's own noise with a random sign; a chooser: plus a shared direction
        random_scales.append(evidence_scale(_after([s * n / n.norm() for s, n in zip(signs, noise)])))
        chooser_scales.append(evidence_scale(_after([(n / n.norm() + 0.3 * common) / (n / n.norm() + 0.3 * common).norm()
                                                     for n in noise])))
    assert sum(random_scales) / 20 < 0.1
    assert min(chooser_scales) > 0.7


def test_evidence_round_trips_through_tensors():
    e = _after([torch.tensor([0.6, 0.8]), torch.tensor([1.0, 0.0])])
    back = Evidence.from_tensors(e.to_tensors())
    assert back.count == 2 and torch.equal(back.total, e.total)
    assert torch.equal(back.sketches, e.sketches.half().float())      # float16 on disk
    assert Evidence.from_tensors(Evidence().to_tensors()).total is None
    older = {k: v for k, v in e.to_tensors().items() if k != "sketches"}    # saved before the sketches
    assert Evidence.from_tensors(older).sketches is None and null_sd(Evidence.from_tensors(older)) == 0.0


def _units(count: int, dim: int, rank: int, seed: int) -> list[torch.Tensor]:
    """Random unit vectors of length ``dim`` that live in a random ``rank``-dimensional subspace."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=g))[0]
    units = [basis @ torch.randn(rank, generator=g) for _ in range(count)]
    return [u / u.norm() for u in units]


@pytest.mark.parametrize("rank", [6, 3000])
def test_null_sd_is_the_spread_of_the_agreement_under_random_signs(rank):
    """√V from the sketches against the exact 2·Σ_{i≠j}(u_i·u_j)², and that against the spread of
    |Σ s_i u_i|² over 4000 random sign vectors s (the null of random clicks)."""
    units = _units(30, 6000, rank, seed=rank)
    stack = torch.stack(units)
    gram = stack @ stack.T
    exact = float(2 * (gram.pow(2).sum() - gram.diagonal().pow(2).sum())) ** 0.5
    signs = torch.randint(0, 2, (4000, 30), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    spread = float((signs @ stack).pow(2).sum(dim=1).std())
    assert spread == pytest.approx(exact, rel=0.1)
    estimate = null_sd(_after(units))
    assert estimate == pytest.approx(exact, rel=0.15, abs=2.0)
    if rank == 6:       # few shared directions: the null spreads ~ k·√(2/rank), far past James–Stein's k
        assert estimate > 0.4 * 30


def test_evidence_z_shuts_chance_agreement_of_few_directions_and_keeps_a_chooser():
    """Random-sign clicks whose gradients share 4 directions open James–Stein's factor by chance;
    z = 1 null sd keeps it near shut, while a chooser with a common direction still opens it."""
    g = torch.Generator().manual_seed(3)
    random_js, random_z, chooser_z = [], [], []
    for trial in range(30):
        units = _units(20, 500, 4, seed=100 + trial)
        signs = torch.randint(0, 2, (20,), generator=g) * 2 - 1
        flipped = _after([s * u for s, u in zip(signs, units)])
        random_js.append(evidence_scale(flipped))
        random_z.append(evidence_scale(flipped, z=1.0))
        chooser_z.append(evidence_scale(_after(units[:1] * 20), z=1.0))   # identical clicks: full agreement
    assert sum(random_js) / 30 > 0.08                 # the failure z addresses
    assert sum(random_z) / 30 < 0.5 * sum(random_js) / 30
    assert min(chooser_z) > 0.5


def test_unit_gradient_flattens_every_parameter():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad = torch.tensor([3.0, 0.0])
    assert torch.equal(unit_gradient([a, b]), torch.tensor([1.0, 0.0, 0.0]))   # no grad counts as 0
    a.grad = torch.zeros(2)
    assert unit_gradient([a, b]) is None


@pytest.mark.parametrize("family, grid", [("sd1", 0), ("sdxl", 1)])
def test_session_steps_by_the_evidence_and_checkpoints_it(tmp_path, family, grid):
    """On SD 1.x and SDXL shapes (the latter with channel-mean log-probs, logprob_grid=1), with
    James–Stein's threshold (evidence_z=0; the z > 0 threshold has its own tests below)."""
    from d3po_studio import Session
    from d3po_studio.core.tiny import tiny_pipeline
    rho, pipe = 0.01, tiny_pipeline(family)
    s = Session.open(tmp_path / "s", model=f"tiny-{family}", pipeline=pipe, steps=6, dtype="float32",
                     optimizer="adamw", step_rms=rho, step_evidence=True, logprob_grid=grid, train_fraction=1.0,
                     evidence_z=0.0)
    try:
        lora = [p.detach().clone() for p in s.params]
        first = s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
        assert first["evidence_scale"] == pytest.approx(0.0, abs=1e-6)
        assert all(torch.allclose(p, q, atol=1e-9) for p, q in zip(s.params, lora))   # no step yet
        # the LoRA has not moved, so the same batch gives the same gradient u: seed the evidence
        # with three earlier clicks along it and the factor is 1 − 4/|4u|² = 0.75
        u = s._train.evidence.total.clone()
        s._train.evidence.total, s._train.evidence.count = 3 * u, 3
        batch = s.sample("a red circle", n=2, seed=0)      # the same noise: the same gradient
        probes = probe_steps(6)
        before = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
        report = s.prefer(batch, best=1)
        after = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
        expected = evidence_scale(_joint(s))      # |4u|² over k = 4, u one unit vector a click
        assert report["evidence_scale"] == pytest.approx(expected) == pytest.approx(1 - 4 / 16, abs=1e-4)
        assert rms_change(before, after) == pytest.approx(rho * expected, rel=0.05)
        kept = (s._train.evidence.total.clone(), s._train.evidence.count, s._train.evidence.sketches.clone())
        assert len(kept[2]) == 2          # one sketch per click the session saw (the seeded three are not)
        s.close()
        s = Session.open(tmp_path / "s", model=f"tiny-{family}", pipeline=pipe)
        assert s._train.evidence.count == kept[1] and torch.equal(s._train.evidence.total, kept[0])
        assert torch.equal(s._train.evidence.sketches, kept[2].half().float())
        s.undo()
        assert s._train.evidence.count == 1 and torch.allclose(s._train.evidence.total, u)
        assert torch.equal(s._train.evidence.sketches, kept[2][:1].half().float())
        # a rolled-back update leaves the evidence as it was
        import d3po_studio.core.trust_region as trust_region

        def failing(*a, **k):
            raise FloatingPointError("non-finite gradient norm (nan)")
        with mock.patch.object(trust_region, "evidence_step", failing):
            with pytest.raises(Exception, match="rolled back"):
                s.prefer(s.sample("a red circle", n=2, seed=5), best=0)
        assert s._train.evidence.count == 1 and torch.allclose(s._train.evidence.total, u)
        assert len(s._train.evidence.sketches) == 1
    finally:
        s.close()


def test_evidence_without_a_trust_region_steps_lr_times_the_evidence(tmp_path, tiny_sd1):
    """step_rms=None: the step along −Σu is lr × the factor RMS per LoRA weight (James–Stein's factor, z = 0),
    each of the default LoRA's two parts along its own share of −Σu."""
    from d3po_studio import Session
    from d3po_studio.core.lora import group_by_targets
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      optimizer="adamw", step_rms=None, step_evidence=True, lr=1e-3, evidence_z=0.0) as s:
        batch = s.sample("a red circle", n=2, seed=0)
        ordered, sizes = group_by_targets(s.pipe.unet, s.params, s.settings.resolved_parts)
        assert len(sizes) == 2          # the evidence's order: the convolutions', then self-attention's weights
        start = [p.detach().clone() for p in ordered]
        assert s.prefer(batch, best=1)["evidence_scale"] == 0.0
        assert all(torch.equal(p, q) for p, q in zip(ordered, start))
        u = s._train.evidence.total.clone()
        s._train.evidence.total, s._train.evidence.count = 3 * u, 3
        s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
        moved = torch.cat([(p - q).reshape(-1) for p, q in zip(ordered, start)])
        assert float(moved.pow(2).mean().sqrt()) == pytest.approx(1e-3 * 0.75, rel=1e-3)
        for part, unit in zip(moved.split(sizes), u.split(sizes)):     # each part's factor is 0.75 too
            assert float(part.pow(2).mean().sqrt()) == pytest.approx(1e-3 * 0.75, rel=1e-3)
            assert torch.allclose(part / part.norm(), -unit, atol=1e-5)


def test_evidence_without_a_trust_region_or_anchor_runs_no_probes(tmp_path, tiny_sd1):
    """step_rms=None and drift_budget=None: nothing is measured, so no trust region is built (the
    evidence's own statistics must not be mistaken for a reason to measure)."""
    from d3po_studio import Session
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      optimizer="adamw", step_rms=None, drift_budget=None, step_evidence=True) as s:
        for seed in (0, 0):
            report = s.prefer(s.sample("a red circle", n=2, seed=seed), best=1)
        assert "evidence_power" in report and "step_rms_raw" not in report and "step_scale" not in report


def test_a_stored_session_keeps_the_update_it_was_trained_with():
    """A session.json written before logprob_grid and step_evidence existed reopens without them, and
    one written before the tenth session's defaults (step_weight, evidence_z) with what it had."""
    from d3po_studio.core.config import ADDED_LATER, Settings
    old = {k: v for k, v in Settings().to_dict().items() if k not in ADDED_LATER}
    assert Settings.stored(old).step_evidence is False and Settings.stored(old).logprob_grid == 0
    assert Settings.stored(old).drift_budget is None and Settings().drift_budget is not None
    assert Settings.stored(old).evidence_z == 0.0 and Settings().evidence_z == 2.0
    assert Settings.stored(old).step_weight == "noise" and Settings().step_weight == "x0"
    assert Settings.stored(old).anchor_probes == 3 and Settings().anchor_probes == 1   # 23rd session
    assert Settings.stored(old).evidence_gate == "each" and Settings().evidence_gate == "joint"   # 25th
    assert Settings.stored(Settings().to_dict()) == Settings()


def test_the_default_update_moves_the_lora_without_optimizer_states(tmp_path, tiny_sd1):
    """The defaults step along the evidence: the LoRA moves once clicks agree, and the optimizer
    is never stepped, so it holds no states (the memory tables measure the optimizer's path)."""
    from d3po_studio import Session
    from d3po_studio.core.config import Settings
    d = Settings()      # the defaults docs/settings.md states and the study chose
    assert (d.logprob_grid, d.step_evidence, d.step_rms, d.drift_budget) == (1, True, 0.02, 0.07)
    assert (d.step_weight, d.evidence_z, d.beta) == ("x0", 2.0, 0.1)
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      optimizer="adamw") as s:
        start = [p.detach().clone() for p in s.params]
        # the same batch and pick: clicks that agree exactly, |Σu|² = k², over the threshold
        # k + z·√(2k(k−1)) at z = 2 from the fourth click on
        for _ in range(4):
            report = s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
        assert report["evidence_scale"] > 0 and "drift_rms" in report
        assert not all(torch.equal(p, q) for p, q in zip(s.params, start))
        assert not s.optimizer.state


def test_evidence_z_in_a_session_raises_the_threshold_by_the_clicks_null_spread(tmp_path, tiny_sd1):
    """The same clicks (three different batches, then one more) in two sessions: with z = 1 the
    factor is 1 − (k + √V)/|Σu|², √V from the session's own sketches, and never above z = 0's."""
    from d3po_studio import Session
    from d3po_studio.core.trust_region import null_sd
    scales = {}
    for z in (0.0, 1.0):
        with Session.open(tmp_path / f"z{z}", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                          optimizer="adamw", evidence_z=z) as s:
            for seed in (0, 1, 0, 0):
                report = s.prefer(s.sample("a red circle", n=2, seed=seed), best=1)
            e = _joint(s)
            assert len(e.sketches) == e.count == 4
            assert report["evidence_null_sd"] == pytest.approx(null_sd(e) / 4) and null_sd(e) > 0
            power = report["evidence_power"] * 4
            scales[z] = report["evidence_scale"]
            if z:
                assert scales[z] == pytest.approx(max(0.0, 1 - (4 + null_sd(e)) / power), abs=1e-6)
    assert scales[1.0] <= scales[0.0]


@pytest.mark.parametrize("objective", ["d3po", "diffusion-dpo"])
def test_a_clicks_choice_part_flips_with_the_choice_and_the_whole_gradient_does_not(tmp_path, tiny_sd1, objective):
    """With the LoRA away from the base, picking the other image of the same batch turns the choice's
    part of the click gradient exactly around (u → −u): the evidence then adds nothing the choice
    did not set. The whole gradient keeps the pull, the same for both picks, so it does not.
    (backward="split" computes the same gradients as the joint one: tests/test_bench.py.)"""
    from d3po_studio import Session
    from d3po_studio.core.objectives import get_objective
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      optimizer="adamw", objective=objective) as s:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():          # a LoRA that has moved: both its factors away from zero
            for p in s.params:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
        batch = s.sample("a red circle", n=2, seed=0)

        def unit(part, pairs):
            s.optimizer.zero_grad(set_to_none=True)
            get_objective(objective)(s.pipe, batch.trajectory, pairs, s.settings.replace(gradient_part=part),
                                     device=s.runtime.device, generator=torch.Generator().manual_seed(1))
            return unit_gradient(s.params)

        choice = unit("choice", [(0, 1)]) + unit("choice", [(1, 0)])
        whole = unit("whole", [(0, 1)]) + unit("whole", [(1, 0)])
        assert float(choice.norm()) < 1e-5
        # the pull the two picks share: smaller the smaller β is (0.006 at the default β 0.1), and
        # still a hundred times the choice part's bound
        assert float(whole.norm()) > 1e-3


def test_evidence_parts_normalise_sketch_and_open_each_part_on_its_own():
    """Per part (``evidence_parts``): each part of a click's gradient is a unit vector of its own,
    sketched in its own block, and each part's factor is James–Stein's on that part alone."""
    from d3po_studio.core.trust_region import SKETCH, split_evidence
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0, 2.0])
    assert torch.allclose(unit_gradient([a, b], [2, 3]), torch.tensor([0.6, 0.8, 0.0, 0.0, 1.0]))
    b.grad = torch.zeros(3)
    assert torch.allclose(unit_gradient([a, b], [2, 3]), torch.tensor([0.6, 0.8, 0.0, 0.0, 0.0]))   # a part without gradient stays 0
    a.grad = torch.zeros(2)
    assert unit_gradient([a, b], [2, 3]) is None
    # part 0 agrees on every click, part 1 alternates: only part 0 has evidence
    agree, flip = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    e = Evidence()
    for k in range(4):
        e = add_click(e, torch.cat([agree, flip * (-1) ** k]), [2, 3])
    assert e.sketches.shape == (4, 2 * SKETCH)
    first, second = split_evidence(e, [2, 3])
    assert first.count == second.count == 4
    assert evidence_scale(first) == pytest.approx(1 - 4 / 16) and evidence_scale(second) == 0.0
    assert torch.equal(first.sketches, e.sketches[:, :SKETCH])
    assert null_sd(first) == pytest.approx(null_sd(_after([agree] * 4)))        # the block is the part's own sketch
    with pytest.raises(ValueError, match="sketched in 2 part"):
        add_click(e, torch.cat([agree, flip]))


def test_joint_evidence_of_parts_has_the_null_of_one_unit_vector_a_click():
    """``evidence_gate="joint"``: the parts side by side, scaled by 1/√K, are one unit vector a
    click; under random winners (a sign flips every part of a click at once) |Σu|² has mean k and
    the spread ``null_sd`` reads from the parts' sketch blocks, though the parts share few
    directions (3) in one and many (3000) in the other."""
    from d3po_studio.core.trust_region import joint_evidence
    first, second = _units(30, 4000, 3, seed=7), _units(30, 6000, 3000, seed=8)
    joined = torch.stack([torch.cat([a, b]) / 2 ** 0.5 for a, b in zip(first, second)])
    gram = joined @ joined.T
    exact = float(2 * (gram.pow(2).sum() - gram.diagonal().pow(2).sum())) ** 0.5
    signs = torch.randint(0, 2, (4000, 30), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    power = (signs @ joined).pow(2).sum(dim=1)
    assert float(power.mean()) == pytest.approx(30, rel=0.05)
    assert float(power.std()) == pytest.approx(exact, rel=0.1)
    e = Evidence()
    for a, b in zip(first, second):
        e = add_click(e, torch.cat([a, b]), [4000, 6000])
    whole = joint_evidence(e, [4000, 6000])
    assert torch.allclose(whole.total, joined.sum(0), atol=1e-5) and whole.count == 30
    assert null_sd(whole) == pytest.approx(exact, rel=0.15)
    # the joint spread is smaller than the few-direction part's own: both parts' noise has to agree
    assert null_sd(whole) < 0.8 * null_sd(_after(first))
    assert joint_evidence(e, [10000]) is e


def test_evidence_parts_default_to_one_part_per_kind_of_layer():
    """``evidence_parts=None`` groups lora_targets by the kind of layer they sit on; one kind is the
    whole LoRA as one part, as () is; a stored None or list comes back as it was."""
    from d3po_studio.core.config import Settings, parts_by_kind
    assert parts_by_kind(("conv1", "attn1.to_q", "conv2", "attn1.to_out.0")) == ("conv1+conv2", "attn1.to_q+attn1.to_out.0")
    assert parts_by_kind(("to_q", "to_v", "ff.net.2", "proj_in")) == ("to_q+to_v", "ff.net.2", "proj_in")
    assert parts_by_kind(("attn1.to_q", "attn2.to_q")) == ("attn1.to_q", "attn2.to_q")
    assert Settings(lora_targets=("conv1", "conv2")).resolved_parts == ("conv1+conv2",)
    assert Settings(lora_targets=("conv1", "to_q"), evidence_parts=()).resolved_parts == ()
    for s in (Settings(evidence_parts=None), Settings(lora_targets=("conv1", "to_q"), evidence_parts=("conv1+to_q",))):
        assert Settings.from_dict(s.to_dict()) == s and Settings.stored(s.to_dict()) == s


def test_evidence_parts_must_name_each_lora_target_once():
    from d3po_studio.core.config import Settings
    from d3po_studio.core.errors import ConfigError
    s = Settings(lora_targets=("conv1", "conv2", "to_q"), evidence_parts=("conv1+conv2", "to_q"))
    assert Settings.from_dict(s.to_dict()) == s
    for parts in (("conv1+conv2",), ("conv1+conv2", "to_q", "to_q"), ("conv1+conv2+", "to_q"), ("conv1", "conv2+to_v")):
        with pytest.raises(ConfigError, match="evidence_parts"):
            Settings(lora_targets=("conv1", "conv2", "to_q"), evidence_parts=parts)


@pytest.mark.parametrize("gate, sized", [("each", 0.75), ("joint", 0.5)])
def test_a_session_with_evidence_parts_steps_only_the_part_whose_clicks_agree(tmp_path, tiny_sd1, gate, sized):
    """Two parts (the ResNet convolutions and self-attention): with the convolutions' share of the
    evidence seeded to agree and self-attention's to cancel, the step moves the convolutions' LoRA
    only, and the evidence survives a reopen. The step is the trust region's ρ × the evidence: with
    ``evidence_gate="each"`` the convolutions' own factor (|4u|² = 16 over k = 4: 0.75), with
    "joint" the factor of both parts as one unit vector a click ((16 + 0)/2 = 8 over k = 4: 0.5)."""
    from d3po_studio import Session
    from d3po_studio.core.lora import group_by_targets
    parts = ("conv1+conv2", "attn1.to_q+attn1.to_k+attn1.to_v+attn1.to_out.0")
    targets = tuple(t for part in parts for t in part.split("+"))
    rho = 0.01
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=6, dtype="float32",
                      optimizer="adamw", step_rms=rho, drift_budget=None, evidence_z=0.0,
                      lora_targets=targets, evidence_parts=parts, evidence_gate=gate) as s:
        ordered, sizes = group_by_targets(s.pipe.unet, s.params, parts)
        assert len(sizes) == 2 and all(sizes) and sum(sizes) == sum(p.numel() for p in s.params)
        first = s.prefer(s.sample("a red circle", n=2, seed=0), best=1)
        assert first["evidence_scale"] == 0.0 and first["evidence_scale_0"] == first["evidence_scale_1"] == 0.0
        u = s._train.evidence.total.clone()
        assert u[:sizes[0]].norm() == pytest.approx(1.0) and u[sizes[0]:].norm() == pytest.approx(1.0)
        # three earlier clicks: along u on the convolutions; on self-attention summing to −u, so
        # that this click's u cancels them
        seeded = torch.cat([3 * u[:sizes[0]], -u[sizes[0]:]])
        s._train.evidence.total, s._train.evidence.count = seeded, 3
        start = [p.detach().clone() for p in ordered]
        batch = s.sample("a red circle", n=2, seed=0)          # the same noise: the same gradient u
        probes = probe_steps(6)
        before = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
        report = s.prefer(batch, best=1)
        after = predictions(s.pipe, batch.trajectory, probes, [0, 1], s.settings.guidance, "cpu")
        assert report["evidence_scale_0"] == pytest.approx(0.75, abs=1e-4)     # |4u|² = 16 over k = 4
        assert report["evidence_scale_1"] == 0.0                                 # |Σu|² = 0 < k
        assert report["evidence_scale"] == pytest.approx(sized, abs=1e-4)
        assert report["evidence_power"] == pytest.approx((16 if gate == "each" else 8) / 4, abs=1e-4)
        assert rms_change(before, after) == pytest.approx(rho * sized, rel=0.05)
        counts = torch.tensor([p.numel() for p in ordered]).cumsum(0)
        n_conv = int((counts <= sizes[0]).sum())           # the convolutions' weights come first
        moved = [not torch.equal(p, q) for p, q in zip(ordered, start)]
        assert n_conv < len(ordered) and any(moved[:n_conv]) and not any(moved[n_conv:])
        kept = s._train.evidence.total.clone()
    with Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1) as s:
        assert s.settings.evidence_parts == parts and torch.equal(s._train.evidence.total, kept)
        assert s._train.evidence.sketches.shape[1] == 2 * 2048
