"""The preference model of ``proxy_candidates`` (core/proxy.py) and its pairs in the session.

The model: Bradley–Terry weights against a hand-solved case, a gate that opens for a consistent
chooser and stays shut for random clicks, predictions that never see the click they predict.
The session: extra pairs weigh exactly like the click's own, and a session with the option
trains a labelled pair of freshly sampled images once the gate opens (and not before).
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from d3po_studio.core import proxy
from d3po_studio.core.config import Settings
from d3po_studio.core.errors import ConfigError
from d3po_studio.core.lora import add_lora
from d3po_studio.core.runtime import make_optimizer
from d3po_studio.core.sampling import sample_trajectory
from d3po_studio.core.update import train_step


def test_fit_matches_the_hand_solved_case():
    # one pair, one feature, d = 1, l2 = 1: minimise log(1 + e^-w) + w²/2, i.e. w = 1 / (1 + e^w)
    lo, hi = 0.0, 1.0
    for _ in range(60):                    # bisection, independent of the Newton solver
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid < 1 / (1 + math.exp(mid)) else (lo, mid)
    assert proxy.fit(np.array([[1.0]]), l2=1.0)[0] == pytest.approx(lo, abs=1e-9)
    assert lo == pytest.approx(0.4011, abs=1e-4)


def test_binomial_p_against_hand_numbers():
    assert proxy.binomial_p(15, 20, 0.5) == pytest.approx(21700 / 2**20)   # Σ_{k≥15} C(20, k) / 2^20
    assert proxy.binomial_p(0, 7, 0.3) == pytest.approx(1.0)
    assert proxy.binomial_p(3, 3, 0.25) == pytest.approx(0.25 ** 3)


def _clicks(labels_from, count=40, n=2, dim=12, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        f = rng.normal(size=(n, dim))
        w = labels_from(f, rng)
        out.append(proxy.Click(f, tuple((w, j) for j in range(n) if j != w)))
    return out


def test_gate_opens_for_a_consistent_chooser_and_stays_shut_for_random_clicks():
    direction = np.linspace(-1, 1, 12)
    for seed in range(5):
        consistent = _clicks(lambda f, rng: int(np.argmax(f @ direction)), seed=seed)
        said = proxy.gate(consistent)
        assert said["open"] and said["hits"] >= 15, said
        assert not proxy.gate(consistent[:proxy.MIN_HISTORY + proxy.MIN_PREDICTED - 1])["open"]  # too few yet
        random_clicks = _clicks(lambda f, rng: int(rng.integers(2)), seed=100 + seed)
        assert not proxy.gate(random_clicks)["open"], proxy.gate(random_clicks)
    best_of_4 = _clicks(lambda f, rng: int(np.argmax(f @ direction)), n=4)
    said = proxy.gate(best_of_4)
    assert said["open"] and said["predicted"] == proxy.WINDOW


def test_prequential_never_lets_a_click_predict_itself():
    # click i differs only in feature i, winner 1: a model that had seen click i would rank it
    # right; fitted on the clicks before it, that feature's weight is 0 and the images tie
    clicks = []
    for i in range(12):
        f = np.zeros((2, 12))
        f[1, i] = 1.0
        clicks.append(proxy.Click(f, ((1, 0),)))
    assert proxy.prequential(clicks, window=12, min_history=1) == [False] * 11
    seen = proxy.model(clicks)
    assert all(np.argmax(proxy.scores(c.features, seen)) == 1 for c in clicks)


def test_image_features_are_generic_statistics():
    dark, light = Image.new("RGB", (32, 32), (40, 40, 40)), Image.new("RGB", (32, 32), (200, 200, 200))
    striped = Image.fromarray(np.tile(np.array([[0], [255]], np.uint8), (16, 32))).convert("RGB")
    f = proxy.image_features([dark, light, striped])
    assert f.shape == (3, proxy.THUMB * proxy.THUMB * 3 + 6)
    assert (f[1, :192] > f[0, :192]).all()                          # the thumbnail sees brightness
    assert f[0, -3] == 0 and f[2, -3] > 0.4                         # detail: none on a flat image
    assert proxy.extreme_pair(np.array([0.2, -1.0, 3.0])) == (2, 1)


def test_proxy_candidates_setting_is_checked():
    assert Settings(proxy_candidates=4).proxy_candidates == 4
    with pytest.raises(ConfigError, match="proxy_candidates"):
        Settings(proxy_candidates=1)


def test_extra_pairs_weigh_exactly_like_the_clicks_own(tiny_sd1):
    """Training a click with a copy of itself as the extra pair gives the very same step."""
    pipe = tiny_sd1
    pipe.set_progress_bar_config(disable=True)
    s = Settings(steps=4, dtype="float32", optimizer="adamw", guidance=3.0, step_evidence=False)
    params = add_lora(pipe.unet, s.lora_rank, s.lora_alpha, s.lora_targets, seed=0)
    traj = sample_trajectory(pipe, "a red circle", "", 3, seed=1, steps=4, guidance=3.0, eta=1.0,
                             height=16, width=16, device="cpu")
    start = [p.detach().clone() for p in params]
    after = []
    for extra in ([], [(traj, [(0, 1), (0, 2)])]):
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)
        optimizer = make_optimizer("adamw", params, s.lr, s.weight_decay)
        metrics, _ = train_step(pipe, traj, [(0, 1), (0, 2)], s, params, optimizer, device="cpu",
                                update_index=0, extra=extra)
        after.append([p.detach().clone() for p in params])
    assert "extra_loss" in metrics
    moved = sum(float((a - b).abs().sum()) for a, b in zip(after[0], start))
    assert moved > 0
    # The two runs add the same terms in another order. With step_weight="x0" the smallest gradients
    # (3e-7 here, median 1e-3) are differences of far larger terms, and Adam's first step
    # lr·g/(|g| + 1e-8) passes their float32 rounding on: 7.7e-5 of lr on one weight of 128, measured
    for a, b in zip(after[0], after[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4 * s.lr)


def test_session_trains_a_labelled_pair_once_the_gate_opens(tmp_path, tiny_sd1, monkeypatch):
    from d3po_studio import Session
    monkeypatch.setattr(proxy, "MIN_HISTORY", 1)
    monkeypatch.setattr(proxy, "MIN_PREDICTED", 2)
    monkeypatch.setattr(proxy, "ALPHA", 1.01)        # the gate's statistics are tested above
    s = Session.open(tmp_path / "s", model="tiny-sd1", pipeline=tiny_sd1, steps=4, dtype="float32",
                     optimizer="adamw", proxy_candidates=3)
    sampled = []
    real = proxy.image_features

    def counting(images):
        sampled.append(len(images))
        return real(images)
    monkeypatch.setattr(proxy, "image_features", counting)
    try:
        reports = []
        for i in range(4):
            batch = s.sample("a red circle", n=2, seed=i)
            best = int(np.argmax([np.asarray(im, float).mean() for im in batch.images]))
            reports.append(s.prefer(batch, best=best))
        assert [r["proxy"]["pairs"] for r in reports] == [0, 0, 1, 1]
        assert [r["proxy"]["predicted"] for r in reports] == [0, 1, 2, 3]
        assert "extra_loss" in reports[2] and "extra_loss" not in reports[1]
        assert sampled == [2, 2, 2, 3, 2, 3]     # each round's features once, plus 3 candidates per open click
        s.undo()                                  # an undone click no longer teaches the model
        batch = s.sample("a red circle", n=2, seed=9)
        assert len(s._proxy_clicks(batch)) == 3
    finally:
        s.close()


def test_session_without_the_option_samples_nothing_more(tiny_session, monkeypatch):
    monkeypatch.setattr(proxy, "gate", lambda clicks: pytest.fail("the gate ran with the option off"))
    report = tiny_session.prefer(tiny_session.sample("a red circle", n=2, seed=0), best=0)
    assert "proxy" not in report and "extra_loss" not in report
