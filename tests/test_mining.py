"""Noisy-pair maths against hand computations: DBPM statistics and weights, PLD probabilities, the Mann–Whitney loss."""

import math

import pytest
import torch

from prefalign.losses import good_bad_pairs, mann_whitney_loss
from prefalign.mining import dbpm_statistics, dbpm_weights, pld_sampling_probs


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------------------ DBPM


def test_dbpm_statistics_by_hand():
    # 10 pairs, t = 2 epochs recorded of E = 4 planned: m_i = (1/2)·(1/4·ℓ1 + 2/4·ℓ2).
    history = [[1.0, 1.0]] * 8 + [[9.0, 9.0], [0.0, 0.0]]
    stats = dbpm_statistics(torch.tensor(history, dtype=torch.float64), max_epochs=4, cut_noisy=1.0, cut_faulty=2.0)
    m = [0.5 * (0.25 * a + 0.5 * b) for a, b in history]
    assert stats.m.tolist() == pytest.approx(m)
    mu = sum(m) / 10
    sigma = math.sqrt(sum((x - mu) ** 2 for x in m) / 10)  # population std, numpy's default
    assert float(stats.mu) == pytest.approx(mu) and float(stats.sigma) == pytest.approx(sigma)
    # by hand: m = 0.375 (×8), 3.375, 0 → μ = 0.6375, σ ≈ 0.9305: μ + 2σ ≈ 2.50 ≤ 3.375 (faulty), μ − σ ≈ −0.29 < 0
    assert stats.faulty.tolist() == [False] * 8 + [True, False]
    assert stats.noisy.tolist() == [False] * 10
    loose = dbpm_statistics(torch.tensor(history), max_epochs=4, cut_noisy=0.5, cut_faulty=2.0)
    assert loose.noisy.tolist() == [False] * 9 + [True]  # 0 ≤ 0.6375 − 0.465 = 0.172


def test_dbpm_statistics_ties_on_the_cut_are_flagged():
    # m = [0, 0, 2, 2]: μ = 1, σ = 1; with cuts of 1 the pairs sit exactly on μ ± σ, and "≤"/"≥" include them.
    stats = dbpm_statistics(torch.tensor([[0.0], [0.0], [2.0], [2.0]]), max_epochs=1, cut_noisy=1.0, cut_faulty=1.0)
    assert float(stats.mu) == 1.0 and float(stats.sigma) == 1.0
    assert stats.noisy.tolist() == [True, True, False, False]
    assert stats.faulty.tolist() == [False, False, True, True]


def test_dbpm_statistics_all_equal_flags_nothing():
    stats = dbpm_statistics(torch.full((5, 3), 0.7), max_epochs=3)
    assert float(stats.sigma) == 0.0 and not stats.noisy.any() and not stats.faulty.any()


@pytest.mark.parametrize("history, epochs", [(torch.ones(3, 4), 3), (torch.tensor([[1.0], [float("nan")]]), 2)])
def test_dbpm_statistics_refuses_bad_history(history, epochs):
    with pytest.raises(ValueError):
        dbpm_statistics(history, max_epochs=epochs)


def test_dbpm_weights_by_hand():
    loss = torch.tensor([0.2, 1.0, 3.0, 3.0], dtype=torch.float64)
    flagged = torch.tensor([True, False, True, False])
    mu, sigma = 1.0, 0.5
    kernel = dbpm_weights(loss, flagged, mu, sigma)
    expected = [math.exp(-(0.8**2) / (2 * 0.25)), 1.0, math.exp(-(2.0**2) / (2 * 0.25)), 1.0]
    assert kernel.tolist() == pytest.approx(expected)
    pdf = dbpm_weights(loss, flagged, mu, sigma, weighting="pdf")
    scale = 1 / (0.5 * math.sqrt(2 * math.pi))
    assert pdf.tolist() == pytest.approx([expected[0] * scale, 1.0, expected[2] * scale, 1.0])
    # the official density exceeds 1 at the mean when σ < 1/√(2π); the kernel never does
    at_mean = torch.tensor([1.0])
    assert float(dbpm_weights(at_mean, torch.tensor([True]), 1.0, 0.3, "pdf")) == pytest.approx(1 / (0.3 * math.sqrt(2 * math.pi)))
    assert float(dbpm_weights(at_mean, torch.tensor([True]), 1.0, 0.3)) == 1.0


def test_dbpm_weights_carry_no_gradient():
    loss = torch.tensor([0.5, 2.0], requires_grad=True)
    weights = dbpm_weights(loss, torch.tensor([True, True]), 1.0, 1.0)
    assert not weights.requires_grad


# ------------------------------------------------------------------------------------------------------ PLD


def test_pld_sampling_probs_by_hand():
    losses = torch.tensor([1.0, 2.0, 3.0, 5.0, 0.4, 0.4], dtype=torch.float64)
    groups = torch.tensor([7, 7, 7, 3, 9, 9])
    probs = pld_sampling_probs(losses, groups, temperature=0.5)
    # group 7: mean 2, population std √(2/3); z = (−1, 0, 1)/√(2/3); p ∝ exp(−z/0.5)
    s = math.sqrt(2 / 3)
    w = [math.exp(2 / s), 1.0, math.exp(-2 / s)]
    expected = [x / sum(w) for x in w] + [1.0, 0.5, 0.5]  # group of one pair; a group with std 0 is uniform
    assert probs.tolist() == pytest.approx(expected)
    assert probs[0] > probs[1] > probs[2]  # the pair hardest for its prompt is drawn least


def test_pld_sampling_probs_refuses_bad_temperature():
    with pytest.raises(ValueError):
        pld_sampling_probs(torch.ones(2), torch.zeros(2), temperature=0.0)


# ------------------------------------------------------------------------------------------------------ Mann–Whitney


def test_mann_whitney_loss_whole_batch_by_hand():
    rewards = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0])
    # good–bad pairs: (0,1) d=2, (0,3) d=3, (2,1) d=1, (2,3) d=2; −logsigmoid(d) = softplus(−d)
    expected = (softplus(-2) + softplus(-3) + softplus(-1) + softplus(-2)) / 4
    assert float(mann_whitney_loss(rewards, labels)) == pytest.approx(expected)


def test_mann_whitney_loss_within_groups_and_empty_groups():
    rewards = torch.tensor([2.0, 0.0, 1.0, -1.0, 5.0, 4.0], dtype=torch.float64)
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])  # group 2 has no bad item
    expected = (softplus(-2) + softplus(-2)) / 2
    assert float(mann_whitney_loss(rewards, labels, groups)) == pytest.approx(expected)
    good, bad, empty = good_bad_pairs(labels, groups)
    assert good.tolist() == [0, 2] and bad.tolist() == [1, 3] and empty == 1


def test_mann_whitney_loss_without_pairs_is_zero_and_differentiable():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = mann_whitney_loss(rewards, torch.tensor([1, 1]))
    loss.backward()
    assert float(loss.detach()) == 0.0 and rewards.grad.tolist() == [0.0, 0.0]


def test_mann_whitney_gradient_orders_items_like_auc():
    # The gradient of every good item is negative (push up) and of every bad item positive: descent raises the AUC.
    rewards = torch.tensor([0.0, 0.3, -0.2, 0.1], requires_grad=True)
    labels = torch.tensor([1, 0, 0, 1])
    mann_whitney_loss(rewards, labels).backward()
    # d/dr_g of mean softplus(−(r_g − r_b)) = −mean_b sigmoid(−(r_g − r_b)) / |G|·... checked by sign and by hand
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    r = [0.0, 0.3, -0.2, 0.1]
    expected_good0 = -(sig(-(r[0] - r[1])) + sig(-(r[0] - r[2]))) / 4
    assert float(rewards.grad[0]) == pytest.approx(expected_good0)
    assert rewards.grad[0] < 0 and rewards.grad[3] < 0 and rewards.grad[1] > 0 and rewards.grad[2] > 0


def test_good_bad_pairs_refuses_other_labels():
    with pytest.raises(ValueError):
        good_bad_pairs(torch.tensor([1, 2, 0]))


def test_dpo_pair_losses_by_hand():
    from prefalign.losses import dpo_pair_losses

    losses = dpo_pair_losses(torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]), torch.tensor([-2.5, -1.0]),
                             torch.tensor([-2.5, -2.0]), beta=0.5)
    # margins: (−3+2.5) − (−2+2.5) = −1 → softplus(0.5); (−1+1) − (−4+2) = 2 → softplus(−1)
    assert losses.tolist() == pytest.approx([softplus(0.5), softplus(-1.0)])
