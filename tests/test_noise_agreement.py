"""The noise a sampled pair drew, known from its seed, and the clicks' agreement in it
(core/sampling.py:drawn_noise, bench/noise_agreement.py)."""
import json

import numpy as np
import pytest
import torch

from d3po_studio.bench import noise_agreement as na
from d3po_studio.core.logprob import step_mean
from d3po_studio.core.sampling import drawn_noise, make_scheduler, predict_noise, sample_trajectory


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_drawn_noise_is_the_noise_sample_trajectory_drew(tiny_sd1, guidance):
    pipe = tiny_sd1
    traj = sample_trajectory(pipe, "a red circle", "", 2, seed=11, steps=4, guidance=guidance, eta=1.0,
                             height=64, width=64)
    shape = tuple(traj.latents.shape[2:])
    x_T, noise = drawn_noise(11, 2, shape, 4)
    scheduler = make_scheduler(pipe, 4)
    assert torch.allclose(traj.latents[0, :1].float(), (x_T * scheduler.init_noise_sigma).half().float())
    for k, t in enumerate(scheduler.timesteps):
        x = traj.latents[k].float()
        with torch.no_grad():
            eps = predict_noise(pipe.unet, x, t, traj.cond, guidance)
        mean, sigma = step_mean(scheduler, eps, t, x, 1.0)
        recovered = (traj.latents[k + 1].float() - mean) / sigma
        # the kept latents are float16: a step's noise comes back to a few % of its unit spread
        # (up to 0.2 in single values of the late, small-σ steps); another seed's is off by ~1.1
        assert (recovered - noise[k]).abs().mean() < 0.05, k
        assert (recovered - drawn_noise(12, 2, shape, 4)[1][k]).abs().mean() > 0.8, k
        # the bench reads each channel's mean, standardised (×8 on this 8×8 latent, so float16's rounding
        # of x_t and x_{t-1} shows more): within 0.2 of its unit spread
        assert (na.channel_means(recovered) - na.channel_means(noise[k])).abs().max() < 0.2, k


def test_agreement_path_hand_computed():
    same = np.array([[1.0, 0.0], [1.0, 0.0]])
    # k = 2: P = |(2, 0)|²/2 = 2, V = 2·(1² + 1²) = 4, sd = √4/2 = 1, z = (2 − 1)/1
    assert na.agreement_path(same)[1] == pytest.approx(1.0)
    opposite = np.array([[1.0, 0.0], [-1.0, 0.0]])
    assert na.agreement_path(opposite)[1] == pytest.approx(-1.0)
    orthogonal = np.eye(3)
    assert np.isnan(na.agreement_path(orthogonal)[2])          # no spread: nothing to measure against


def test_click_differences_sum_winner_minus_each_loser():
    coarse = np.arange(2 * 1 * 3 * 1, dtype=float).reshape(2, 1, 3, 1)   # 2 clicks, 1 step, 3 images, 1 channel
    # click 0: values 0, 1, 2, winner 2: (2−0) + (2−1) = 3; click 1: 3, 4, 5, winner 0: (3−4) + (3−5) = −3
    assert na.click_differences(coarse, np.array([2, 0]))[:, 0, 0].tolist() == [3.0, -3.0]
    pair = coarse[:, :, :2]
    assert na.click_differences(pair, np.array([1, 0]))[:, 0, 0].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("n", [2, 4])
def test_a_consistent_chooser_passes_the_null_of_random_winners(n):
    rng = np.random.default_rng(3)
    coarse = rng.standard_normal((40, 2, n, 2))          # 40 clicks of n images, 2 steps × 2 channels
    direction = rng.standard_normal((2, 2))
    best = np.argmax((coarse * direction[:, None, :]).sum((1, 3)), axis=1)   # the largest projection wins
    weights = np.ones(2)
    path = na.agreement_path(na.click_vectors(na.click_differences(coarse, best), weights))
    maxima = na.null_maxima(coarse, weights, replicates=200)
    z95 = float(np.quantile(maxima, 0.95))
    assert path[-1] > z95 > 1.0
    assert na.first_at(path, z95, na.FROM_CLICK) is not None
    random_best = rng.integers(n, size=40)
    random_path = na.agreement_path(na.click_vectors(na.click_differences(coarse, random_best), weights))
    assert np.nanmax(random_path[na.FROM_CLICK - 1:]) < z95


def test_along_a_known_direction_hand_computed():
    units = np.array([[1.0, 0.0], [0.6, 0.8], [-0.6, 0.8]])
    share, t = na.along(units, np.array([2.0, 0.0]), 3)
    # projections 1, 0.6, −0.6: mean 1/3, sample sd √((4/9 + 0.071 + 0.871)/2) = 0.8327, t = (1/3)/(0.8327/√3)
    assert share == pytest.approx(2 / 3)
    assert t == pytest.approx(0.6934, abs=1e-3)


def _fake_cell(root, name, choose, pipe, clicks=30, steps=4):
    shape = (pipe.unet.config.in_channels, 64 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    cell = root / name / "session"
    (cell / "rounds").mkdir(parents=True)
    (cell / "session.json").write_text(json.dumps({"model": "tiny-sd1"}))
    for i in range(clicks):
        seed = 1000 + i
        _, noise = drawn_noise(seed, 2, shape, steps)
        best = choose(na.channel_means(noise).numpy(), i)
        folder = cell / "rounds" / f"{i + 1:06d}-x"
        folder.mkdir()
        folder.joinpath("round.json").write_text(json.dumps({
            "n": 2, "status": "applied", "seed": seed, "choice": {"best": best},
            "sampling": {"eta": 1.0, "steps": steps, "height": 64, "width": 64},
            "report": {"evidence_power": 1.0, "evidence_null_sd": 0.5}}))


def test_rows_read_each_pair_cells_noise_from_its_seeds(tmp_path, tiny_sd1):
    # a chooser that prefers the larger mean of channel 0 in the first step's noise, against random picks
    _fake_cell(tmp_path, "v__first__n2__s0", lambda c, i: int(c[0, 1, 0] > c[0, 0, 0]), tiny_sd1)
    _fake_cell(tmp_path, "v__random__n2__s0", lambda c, i: int(np.random.default_rng(i).integers(2)),
               tiny_sd1)
    _fake_cell(tmp_path, "v__first__n2__s1", lambda c, i: int(c[0, 1, 0] > c[0, 0, 0]), tiny_sd1, clicks=30)
    found = na.rows(tmp_path, ["v"], model_for=lambda model: tiny_sd1, at=(10, 25), replicates=50)
    seed1 = [row for row in found if row[1] == "first" and row[3] == "1"][0]
    share, t = seed1[-1].split(" / ")
    assert float(share.rstrip("%")) > 70 and float(t) > 4       # seed 0's direction predicts seed 1's clicks
    found = [row for row in found if row[3] == "0"]
    by_chooser = {row[1]: row for row in found}
    assert set(by_chooser) == {"first", "random"}
    assert by_chooser["first"][:4] == ["v", "first", "pairs", "0"]
    consistent = float(by_chooser["first"][5].split(" / ")[0])
    random_z = float(by_chooser["random"][5].split(" / ")[0])
    assert consistent > 3.0 > random_z
    assert by_chooser["first"][5].endswith(" / +0.0")          # the gradient's z from the round reports
    assert by_chooser["first"][-2] != "—"                     # first click at the 5% level
    assert by_chooser["random"][-1] == "—"                    # no other seed of that chooser to learn a direction from


def test_decompose_finds_a_brightness_choice_in_the_channel_means():
    from d3po_studio.core.loading import load_pipeline
    pipe = load_pipeline("embedded")
    shares = na.decompose(pipe, ["brighter"], count=5, steps=5)
    coarse, fine = shares["brighter"]
    assert fine < 0.5 < coarse


@pytest.mark.parametrize("n", [2, 4])
def test_placement_replay_reproduces_the_agreement_a_session_recorded(tmp_path, tiny_sd1, n):
    """Clicks that never stepped (evidence_z out of reach) leave the LoRA at its start, so replaying
    them on the same placement and LoRA seed gives back each click's recorded P = |Σu|²/k, for pairs
    and for best of 4; replayed beside another placement's LoRA (both at B = 0, one backward) each
    gets the gradient it gets alone."""
    from d3po_studio import Session
    from d3po_studio.bench import placement
    from d3po_studio.core.tiny import tiny_pipeline
    cell = tmp_path / f"v__brighter__n{n}__s0"
    with Session.open(cell / "session", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                      evidence_z=1000.0, seed=0, lora_targets=placement.PLACEMENTS["attn1"]) as s:
        for i, prompt in enumerate(["a red circle", "a blue square", "a green triangle", "a red square",
                                    "a blue circle", "a green square"]):
            s.prefer(s.sample(prompt, n=n, seed=10 + i), best=i % n)
    pipe = tiny_pipeline("sd1")
    alone, reports, best = placement.replay_units(pipe, placement.stacked_loras(pipe, ["attn1"]), cell)
    assert best == [i % n for i in range(6)]
    units = alone["attn1"]
    assert len(units) == 6
    for k in range(1, 7):
        power = float((units[:k].sum(0) ** 2).sum()) / k
        assert power == pytest.approx(reports[k - 1]["evidence_power"], rel=1e-3), k
    pipe = tiny_pipeline("sd1")
    stacked, _, _ = placement.replay_units(pipe, placement.stacked_loras(pipe, ["ff", "attn1"]), cell)
    np.testing.assert_array_equal(stacked["attn1"], units)
    assert stacked["ff"].shape[0] == 6 and np.abs(stacked["ff"]).sum() > 0
    pipe = tiny_pipeline("sd1")                 # a rank and a LoRA seed of its own: another map of the clicks
    other, _, _ = placement.replay_units(pipe, placement.stacked_loras(pipe, ["attn1:r8:s3"]), cell)
    assert other["attn1:r8:s3"].shape == (6, 2 * units.shape[1])
    rows = placement.placement_rows(["ff", "attn1", "attn1:r8:s3"], [cell], pipe=tiny_pipeline("sd1"), replicates=20)
    assert [row[:4] for row in rows] == [[spec, "brighter", str(n), "0"] for spec in ("ff", "attn1", "attn1:r8:s3")]
    # six clicks: the null of random winners ran for pairs; a random best of 4 is not a sign flip
    assert (rows[0][-2] != "—") == (n == 2)
    # every winner replayed: the actual winner's gradient is the one replayed alone (to float noise), and pairs'
    # other winner is its sign flip (at B = 0 the loss is linear in the log-ratios)
    pipe = tiny_pipeline("sd1")
    every, _, _ = placement.replay_units(pipe, placement.stacked_loras(pipe, ["attn1"]), cell, every_winner=True)
    assert every["attn1"].shape == (6, n, units.shape[1])
    np.testing.assert_allclose(every["attn1"][np.arange(6), best], units, atol=1e-5)
    if n == 2:
        np.testing.assert_allclose(every["attn1"][np.arange(6), [1 - b for b in best]], -units, atol=1e-5)
    rows = placement.placement_rows(["attn1"], [cell], pipe=tiny_pipeline("sd1"), replicates=20, every_winner=True)
    assert rows[0][-2] != "—"


def test_a_placement_spec_names_its_rank_and_lora_seed():
    from d3po_studio.bench.placement import PLACEMENTS, lora_spec
    assert lora_spec("conv") == (PLACEMENTS["conv"], 4, None)
    assert lora_spec("conv:r16:s10") == (PLACEMENTS["conv"], 16, 10)
    assert lora_spec("attn1:s2") == (PLACEMENTS["attn1"], 4, 2)
    for bad in ("nowhere", "conv:16", "conv:r0", "conv:x1"):
        with pytest.raises(ValueError):
            lora_spec(bad)
