"""Token-wise KL (plain and chunked), per-token and sequence log-probs."""

import math

import pytest
import torch

from prefalign.logprobs import chunked_token_kl, frozen_head_token_kl
from prefalign.losses import token_kl

F64 = torch.float64


def test_token_kl_zero_for_equal_logits():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(token_kl(logits, logits.clone(), torch.ones(2, 5)), torch.zeros(2))


def test_token_kl_nonnegative():
    for seed in range(50):
        g = torch.Generator().manual_seed(seed)
        pol, ref = torch.randn(3, 4, 11, generator=g) * 3, torch.randn(3, 4, 11, generator=g) * 3
        mask = torch.rand(3, 4, generator=g) > 0.3
        assert (token_kl(pol, ref, mask) >= -1e-6).all()


def test_token_kl_matches_brute_force_loops():
    g = torch.Generator().manual_seed(1)
    pol, ref = torch.randn(2, 3, 4, generator=g, dtype=F64), torch.randn(2, 3, 4, generator=g, dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = []
    for b in range(2):
        total = 0.0
        for t in range(3):
            if not mask[b, t]:
                continue
            z_ref = sum(math.exp(x) for x in ref[b, t].tolist())
            z_pol = sum(math.exp(x) for x in pol[b, t].tolist())
            for v in range(4):
                p_ref = math.exp(ref[b, t, v].item()) / z_ref
                p_pol = math.exp(pol[b, t, v].item()) / z_pol
                total += p_ref * (math.log(p_ref) - math.log(p_pol))
        expected.append(total)
    torch.testing.assert_close(token_kl(pol, ref, mask), torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_token_kl_shift_invariant():
    g = torch.Generator().manual_seed(2)
    pol, ref = torch.randn(2, 5, 9, generator=g, dtype=F64), torch.randn(2, 5, 9, generator=g, dtype=F64)
    mask = torch.rand(2, 5, generator=g) > 0.5
    shifted = token_kl(pol + 100 * torch.randn(2, 5, 1, dtype=F64), ref - 50 * torch.randn(2, 5, 1, dtype=F64), mask)
    torch.testing.assert_close(shifted, token_kl(pol, ref, mask))


def test_token_kl_upcasts_half_precision():
    g = torch.Generator().manual_seed(3)
    pol, ref = torch.randn(2, 4, 6, generator=g).bfloat16(), torch.randn(2, 4, 6, generator=g).bfloat16()
    kl = token_kl(pol, ref, torch.ones(2, 4))
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, token_kl(pol.float(), ref.float(), torch.ones(2, 4)))


MASKS = {
    "all": torch.ones(2, 7, dtype=torch.bool),
    "response_only": torch.tensor([[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool),
    "gaps": torch.tensor([[1, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool),
}


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 20])
@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("skip_empty_chunks", [True, False])
def test_chunked_token_kl_matches_token_kl(chunk_size, mask_name, skip_empty_chunks):
    torch.manual_seed(4)
    mask = MASKS[mask_name]
    hidden_size, vocab = 5, 13
    policy_head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=F64)
    ref_head = torch.nn.Linear(hidden_size, vocab, bias=False, dtype=F64)
    ref_head.requires_grad_(False)
    hidden = torch.randn(2, 7, hidden_size, dtype=F64, requires_grad=True)
    ref_hidden = torch.randn(2, 7, hidden_size, dtype=F64)

    full = token_kl(policy_head(hidden), ref_head(ref_hidden), mask)
    full_grads = torch.autograd.grad(full.sum() + full[0], [hidden, policy_head.weight])
    chunked = chunked_token_kl(hidden, ref_hidden, policy_head, ref_head, mask, chunk_size=chunk_size,
                               skip_empty_chunks=skip_empty_chunks)
    chunked_grads = torch.autograd.grad(chunked.sum() + chunked[0], [hidden, policy_head.weight])

    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    for got, want in zip(chunked_grads, full_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_chunked_token_kl_without_grad_and_bad_chunk_size():
    head = torch.nn.Linear(4, 6)
    hidden, mask = torch.randn(1, 5, 4), torch.ones(1, 5)
    with torch.no_grad():
        kl = chunked_token_kl(hidden, hidden + 1, head, head, mask, chunk_size=2)
        torch.testing.assert_close(kl, token_kl(head(hidden), head(hidden + 1), mask))
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_kl(hidden, hidden, head, head, mask, chunk_size=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_frozen_head_token_kl_matches_token_kl_values_and_hidden_gradients(chunk_size):
    torch.manual_seed(0)
    B, T, H, V = 3, 6, 5, 11
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    ref_hidden = torch.randn(B, T, H, dtype=torch.float64)
    weight, ref_weight = torch.randn(V, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    bias = torch.randn(V, dtype=torch.float64)
    mask = torch.rand(B, T) > 0.4
    mask[2] = False  # a row with no position: KL 0, no gradient

    expected = token_kl(hidden @ weight.T + bias, ref_hidden @ ref_weight.T, mask)
    upstream = torch.tensor([0.3, -1.7, 2.0], dtype=torch.float64)  # an arbitrary, non-uniform upstream gradient
    (expected_grad,) = torch.autograd.grad((expected * upstream).sum(), hidden)

    got = frozen_head_token_kl(hidden, ref_hidden, weight, ref_weight, mask, bias=bias, chunk_size=chunk_size)
    (got_grad,) = torch.autograd.grad((got * upstream).sum(), hidden)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)
    assert got[2] == 0 and got_grad[2].abs().sum() == 0


def test_frozen_head_token_kl_refuses_a_trainable_head():
    hidden = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="trainable"):
        frozen_head_token_kl(hidden, hidden, torch.randn(4, 3, requires_grad=True), torch.randn(4, 3),
                             torch.ones(1, 2, dtype=torch.bool))
