"""RRPO loss (docs/methods/rrpo.md) against hand computations and its limits."""

import math

import pytest
import torch

from prefalign.losses import phrase_rewards, rrpo_loss

F64 = torch.float64


def neg_logsigmoid(z: float) -> float:
    """−log σ(z) = log(1 + e^{−z})."""
    return math.log1p(math.exp(-z))


@pytest.fixture
def hand_batch():
    """B=2, chosen T=4, rejected T=3 (different lengths), with the per-token log-ratios lr spelled out."""
    return dict(
        # pair 0: lr+ = [0.5, -1.0, 0.5, -1.0], ids+ = [0, 1, 1, 2] -> phrase1 = -0.5, phrase2 = -1.0
        # pair 1: lr+ = [0.5,  0.5, 0,   0  ], ids+ = [1, 1, 0, 0] -> phrase1 = 1.0 (last two are padding)
        policy_chosen_logps=torch.tensor([[-1.0, -2.0, -0.5, -3.0], [-0.5, -0.25, 0.0, 0.0]], dtype=F64),
        ref_chosen_logps=torch.tensor([[-1.5, -1.0, -1.0, -2.0], [-1.0, -0.75, 0.0, 0.0]], dtype=F64),
        chosen_phrase_ids=torch.tensor([[0, 1, 1, 2], [1, 1, 0, 0]]),
        # pair 0: lr- = [-1.0, 0.0, -1.0], ids- = [1, 0, 0] -> phrase1 = -1.0, phrase2 missing (0)
        # pair 1: lr- = [-1.0, 0.5, -0.5], ids- = [0, 2, 1] -> phrase1 = -0.5, phrase2 = 0.5 (phrase 2 only in y-)
        policy_rejected_logps=torch.tensor([[-2.0, -1.0, -4.0], [-3.0, -2.0, -1.5]], dtype=F64),
        ref_rejected_logps=torch.tensor([[-1.0, -1.0, -3.0], [-2.0, -2.5, -1.0]], dtype=F64),
        rejected_phrase_ids=torch.tensor([[1, 0, 0], [0, 2, 1]]),
        chosen_kl=torch.tensor([0.2, 1.5], dtype=F64),
    )


def test_rrpo_loss_matches_hand_computation(hand_batch):
    loss, chosen_rewards, rejected_rewards = rrpo_loss(**hand_batch, beta=0.5, alpha=0.1)
    # the rewards that logging reads: β·Σ of each side's phrase-token log-ratios (the sums in the comments below)
    torch.testing.assert_close(chosen_rewards, torch.tensor([-0.75, 0.5], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.0], dtype=F64), rtol=0, atol=1e-12)
    # pair 0: u = 0.5 * ((-0.5 + -1.0) - (-1.0 + 0)) = -0.25 ; L = -logsigmoid(-0.25) + 0.1 * 0.2
    # pair 1: u = 0.5 * ((1.0)        - (-0.5 + 0.5)) =  0.5  ; L = -logsigmoid(0.5)   + 0.1 * 1.5
    expected = [math.log1p(math.exp(0.25)) + 0.02, math.log1p(math.exp(-0.5)) + 0.15]
    assert loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_phrase_rewards_hand_values_and_agree_with_margin(hand_batch):
    b = hand_batch
    chosen = phrase_rewards(b["policy_chosen_logps"], b["ref_chosen_logps"], b["chosen_phrase_ids"], beta=0.5)
    rejected = phrase_rewards(b["policy_rejected_logps"], b["ref_rejected_logps"], b["rejected_phrase_ids"],
                              beta=0.5, num_phrases=2)
    torch.testing.assert_close(chosen, torch.tensor([[-0.25, -0.5], [0.5, 0.0]], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rejected, torch.tensor([[-0.5, 0.0], [-0.25, 0.25]], dtype=F64), rtol=0, atol=1e-12)
    # Σ_k [r(y+_k) − r(y−_k)] is the margin u inside the loss: with α = 0, loss = −logsigmoid(u).
    u = (chosen - rejected).sum(-1)
    torch.testing.assert_close(u, torch.tensor([-0.25, 0.5], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(rrpo_loss(**b, beta=0.5, alpha=0.0)[0], -torch.nn.functional.logsigmoid(u))


def test_phrase_rewards_pads_missing_phrases_and_rejects_bad_ids(hand_batch):
    b = hand_batch
    rewards = phrase_rewards(b["policy_chosen_logps"], b["ref_chosen_logps"], b["chosen_phrase_ids"], 0.5, 4)
    assert rewards.shape == (2, 4) and rewards[:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="phrase ids"):
        phrase_rewards(b["policy_chosen_logps"], b["ref_chosen_logps"], b["chosen_phrase_ids"], 0.5, 1)


def test_phrases_covering_whole_response_reduce_to_dpo():
    torch.manual_seed(0)
    beta = 0.3
    lengths_c, lengths_r = [5, 3], [2, 4]
    pc, rc = -torch.rand(2, 5, dtype=F64) * 3, -torch.rand(2, 5, dtype=F64) * 3
    pr, rr = -torch.rand(2, 4, dtype=F64) * 3, -torch.rand(2, 4, dtype=F64) * 3
    ids_c, ids_r = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)
    for i in range(2):  # every response token in some phrase (one phrase per token); padding has log-prob 0
        pc[i, lengths_c[i]:] = rc[i, lengths_c[i]:] = 0
        pr[i, lengths_r[i]:] = rr[i, lengths_r[i]:] = 0
        ids_c[i, :lengths_c[i]] = torch.arange(1, lengths_c[i] + 1)
        ids_r[i, :lengths_r[i]] = torch.arange(1, lengths_r[i] + 1)
    loss = rrpo_loss(pc, pr, rc, rr, ids_c, ids_r, torch.rand(2, dtype=F64), beta=beta, alpha=0.0)[0]
    for i in range(2):
        dpo_margin = (sum(pc[i].tolist()) - sum(rc[i].tolist())) - (sum(pr[i].tolist()) - sum(rr[i].tolist()))
        assert loss[i].item() == pytest.approx(neg_logsigmoid(beta * dpo_margin), abs=1e-12)


def test_no_phrase_tokens_gives_log2_plus_kl(hand_batch):
    b = dict(hand_batch)
    b["chosen_phrase_ids"] = torch.zeros_like(b["chosen_phrase_ids"])
    b["rejected_phrase_ids"] = torch.zeros_like(b["rejected_phrase_ids"])
    loss = rrpo_loss(**b, beta=0.5, alpha=0.1)[0]
    torch.testing.assert_close(loss, math.log(2) + 0.1 * b["chosen_kl"], rtol=0, atol=1e-12)


def test_rrpo_loss_gradcheck(hand_batch):
    b = hand_batch
    inputs = tuple(b[k].clone().requires_grad_() for k in ("policy_chosen_logps", "policy_rejected_logps",
                                                           "ref_chosen_logps", "ref_rejected_logps", "chosen_kl"))

    def loss_fn(pc, pr, rc, rr, kl):
        return rrpo_loss(pc, pr, rc, rr, b["chosen_phrase_ids"], b["rejected_phrase_ids"], kl, beta=0.5, alpha=0.1)[0]

    assert torch.autograd.gradcheck(loss_fn, inputs)


def test_rrpo_loss_rejects_mismatched_shapes(hand_batch):
    b = dict(hand_batch)
    b["chosen_phrase_ids"] = b["chosen_phrase_ids"][:, :3]
    with pytest.raises(ValueError, match="chosen shapes differ"):
        rrpo_loss(**b)
