"""The D3PO math against hand-computed numbers, torch.distributions and diffusers itself."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from d3po_studio.core.logprob import ddim_step_with_logprob, gaussian_logprob, step_coefficients
from d3po_studio.core.loss import d3po_loss, pairs_from_best, pairs_from_ranking
from d3po_studio.core.tiny import SCHEDULER


@pytest.fixture
def scheduler():
    s = DDIMScheduler(**SCHEDULER)
    s.set_timesteps(10)
    return s


def test_logprob_matches_torch_normal(scheduler):
    g = torch.Generator().manual_seed(0)
    x_t, eps, x_prev = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    t = int(scheduler.timesteps[3])
    a_t, a_prev, sigma = step_coefficients(scheduler, t, eta=1.0)
    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    mean = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps
    expected = torch.distributions.Normal(mean, sigma).log_prob(x_prev).sum(dim=(1, 2, 3))
    _, logp = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=x_prev)
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-3)
    _, logp_mean = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, prev_sample=x_prev, reduction="mean")
    torch.testing.assert_close(logp_mean, expected / (4 * 8 * 8), rtol=1e-5, atol=1e-5)


def test_sigma_matches_diffusers_variance(scheduler):
    t = int(scheduler.timesteps[2])
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    _, _, sigma = step_coefficients(scheduler, t, eta=0.7)
    assert sigma == pytest.approx(0.7 * float(scheduler._get_variance(t, prev_t)) ** 0.5, rel=1e-6)


def test_sampled_step_equals_diffusers_step_with_same_noise(scheduler):
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = int(scheduler.timesteps[5])
    ours, logp = ddim_step_with_logprob(scheduler, eps, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    theirs = scheduler.step(eps, t, x_t, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # the log-prob of the drawn sample is that of its own standard-normal noise
    _, _, sigma = step_coefficients(scheduler, t, 1.0)
    expected = torch.distributions.Normal(0.0, sigma).log_prob(sigma * noise).sum(dim=(1, 2, 3))
    torch.testing.assert_close(logp, expected, rtol=1e-5, atol=1e-2)


def test_v_prediction_mean_matches_diffusers():
    s = DDIMScheduler(**{**SCHEDULER, "prediction_type": "v_prediction"})
    s.set_timesteps(10)
    g = torch.Generator().manual_seed(2)
    x_t, v = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = int(s.timesteps[4])
    ours, _ = ddim_step_with_logprob(s, v, t, x_t, eta=1.0, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, s.step(v, t, x_t, eta=1.0, variance_noise=noise).prev_sample,
                               rtol=1e-5, atol=1e-5)


def test_eta_zero_has_no_density(scheduler):
    x = torch.zeros(1, 4, 8, 8)
    _, logp = ddim_step_with_logprob(scheduler, x, int(scheduler.timesteps[0]), x, eta=0.0)
    assert logp is None


def test_gaussian_logprob_hand_computed():
    # one element, x - mean = 1, sigma = 2: -1/8 - log 2 - log sqrt(2 pi)
    value = gaussian_logprob(torch.tensor([[1.0]]), torch.tensor([[0.0]]), 2.0)
    assert value.item() == pytest.approx(-0.125 - math.log(2) - 0.5 * math.log(2 * math.pi), rel=1e-6)


def test_loss_hand_computed():
    # delta_w = 2, delta_l = -1, beta = 0.5: logits 1.5, loss = log(1 + e^-1.5)
    loss, m = d3po_loss(torch.tensor([5.0]), torch.tensor([0.0]), torch.tensor([3.0]), torch.tensor([1.0]), 0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-6)
    assert m["accuracy"] == 1.0 and m["logratio_winner"] == 2.0 and m["logratio_loser"] == -1.0


def test_loss_limits_beta_to_zero_and_equal_pair():
    w = torch.tensor([3.0, -2.0], requires_grad=True)
    loss, _ = d3po_loss(w, torch.tensor([1.0, 4.0]), torch.zeros(2), torch.zeros(2), beta=1e-9)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-8)
    same = torch.tensor([1.5, 0.5], requires_grad=True)
    loss, m = d3po_loss(same, same, torch.zeros(2), torch.zeros(2), beta=10.0)
    assert loss.item() == pytest.approx(math.log(2)) and m["accuracy"] == 0.0
    loss.backward()
    assert torch.equal(same.grad, torch.zeros(2))   # winner and loser pull equally: no net gradient


def test_loss_is_stable_for_large_logits():
    loss, _ = d3po_loss(torch.tensor([-1e4]), torch.tensor([1e4]), torch.zeros(1), torch.zeros(1), beta=1.0)
    assert loss.item() == pytest.approx(2e4)   # log(sigmoid(x)) would give inf here


def test_loss_gradient_splits_into_the_choice_and_a_pull_the_choice_does_not_set():
    """docs/algorithm.md ("What β does once steps are evidence-sized"): with M = Δ_w − Δ_l,
    dL/dΔ_w = −β/2 + (β/2)·tanh(βM/2) exactly. The first part flips sign with the choice; the
    second, as a gradient on the two images' log-ratios, is the same whichever image was picked."""
    beta = 0.3
    a = torch.tensor([4.0, -1.5, 0.2, 12.0])     # Δ of image A per pair (reference 0)
    b = torch.tensor([1.0, 2.5, 0.2, -3.0])      # Δ of image B
    grads = {}
    for picked in ("A", "B"):
        da, db = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        w, l = (da, db) if picked == "A" else (db, da)
        loss, _ = d3po_loss(w, l, torch.zeros(4), torch.zeros(4), beta)
        (loss * len(a)).backward()           # per-pair gradients (the loss is the mean over pairs)
        grads[picked] = (da.grad, db.grad)
    m = a - b                                     # M when A is picked
    pull = beta / 2 * torch.tanh(beta * m / 2)   # on Δ_A; −pull on Δ_B
    assert torch.allclose(grads["A"][0], -beta / 2 + pull, atol=1e-6)
    assert torch.allclose(grads["B"][0], beta / 2 + pull, atol=1e-6)
    for i in (0, 1):   # the part both choices share is the pull, the rest is ±β/2
        shared = (grads["A"][i] + grads["B"][i]) / 2
        assert torch.allclose(shared, pull if i == 0 else -pull, atol=1e-6)
        assert torch.allclose((grads["A"][i] - grads["B"][i]).abs(), torch.full((4,), beta), atol=1e-6)


def test_the_choice_part_keeps_the_loss_and_drops_the_pull():
    """gradient_part="choice" (core.loss.preference_loss): the same loss value, and the gradient
    −β/2 on the winner's Δ and +β/2 on the loser's whatever M is, so it flips exactly with the
    choice; on Diffusion-DPO's loss it is −½ ∂z of its logits z = −β·[(eʷ−eˡ) − (eʷ_ref−eˡ_ref)]."""
    beta = 0.3
    a = torch.tensor([4.0, -1.5, 0.2, 12.0])
    b = torch.tensor([1.0, 2.5, 0.2, -3.0])
    grads = {}
    for picked in ("A", "B"):
        da, db = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        w, l = (da, db) if picked == "A" else (db, da)
        loss, metrics = d3po_loss(w, l, torch.zeros(4), torch.zeros(4), beta, part="choice")
        whole, _ = d3po_loss(w.detach(), l.detach(), torch.zeros(4), torch.zeros(4), beta)
        assert loss.item() == pytest.approx(whole.item()) == pytest.approx(metrics["loss"])
        (loss * len(a)).backward()
        grads[picked] = (da.grad, db.grad)
    assert torch.allclose(grads["A"][0], torch.full((4,), -beta / 2)) and torch.allclose(grads["A"][1], torch.full((4,), beta / 2))
    assert torch.equal(grads["A"][0], -grads["B"][0]) and torch.equal(grads["A"][1], -grads["B"][1])

    from d3po_studio.core.diffusion_dpo import diffusion_dpo_loss
    e = torch.tensor([0.30, 0.10]).requires_grad_(True)        # the policy's errors of winner, loser
    loss, _ = diffusion_dpo_loss(e[:1], e[1:], torch.tensor([0.2]), torch.tensor([0.25]), beta=50.0, part="choice")
    whole, _ = diffusion_dpo_loss(e[:1].detach(), e[1:].detach(), torch.tensor([0.2]), torch.tensor([0.25]), beta=50.0)
    loss.backward()
    assert loss.item() == pytest.approx(whole.item())
    assert torch.allclose(e.grad, torch.tensor([25.0, -25.0]))     # −½ · (−50, +50)
    with pytest.raises(ValueError, match="whole"):
        d3po_loss(a, b, torch.zeros(4), torch.zeros(4), beta, part="pull")


def test_ratio_clip_zeroes_gradient_outside_trust_region():
    w = torch.tensor([1.0], requires_grad=True)   # ratio e^1 >> 1.1: clamped
    loss, _ = d3po_loss(w, torch.tensor([0.0]), torch.zeros(1), torch.zeros(1), beta=0.1, ratio_clip=0.1)
    loss.backward()
    assert w.grad.item() == 0.0
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.1 * math.log(1.1)))), rel=1e-6)


def test_pairs_convention_winner_first():
    assert pairs_from_best(4, 2) == [(2, 0), (2, 1), (2, 3)]
    assert pairs_from_ranking(3, [1, 2, 0]) == [(1, 2), (1, 0), (2, 0)]
    with pytest.raises(ValueError, match="out of range"):
        pairs_from_best(2, 2)
    with pytest.raises(ValueError, match="exactly once"):
        pairs_from_ranking(3, [0, 0, 1])
    with pytest.raises(ValueError, match="at least 2"):
        pairs_from_best(1, 0)
