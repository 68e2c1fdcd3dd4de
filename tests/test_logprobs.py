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


def _kl_by_hand(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> list[float]:
    """Σ_v p_ref·(log p_ref − log p_θ) per row of [N,V] logits in float64 loops, terms with p_ref = 0 left out."""
    out = []
    for pol, ref in zip(policy_logits.tolist(), ref_logits.tolist()):
        z_pol = math.log(sum(math.exp(x) for x in pol if x != -math.inf))
        z_ref = math.log(sum(math.exp(x) for x in ref if x != -math.inf))
        out.append(sum(math.exp(r - z_ref) * ((r - z_ref) - (p - z_pol)) for p, r in zip(pol, ref) if r != -math.inf))
    return out


def test_token_kl_with_minus_inf_reference_logits_matches_hand_computation():
    """Vocabulary entries the reference gives probability 0 (a −inf logit, e.g. a masked token) contribute exactly 0,
    also where the policy's logit is −inf there too; the gradient w.r.t. the policy logits is p_θ − p_ref."""
    inf = math.inf
    ref = torch.tensor([[[0.5, -inf, 1.0, -0.3], [2.0, 0.0, -inf, -inf]]], dtype=F64)
    pol = torch.tensor([[[0.1, 0.7, -0.2, 0.4], [1.0, -1.0, -inf, 0.3]]], dtype=F64, requires_grad=True)
    kl = token_kl(pol, ref, torch.ones(1, 2))
    expected = sum(_kl_by_hand(pol[0].detach(), ref[0]))
    torch.testing.assert_close(kl, torch.tensor([expected], dtype=F64), rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(kl.sum(), pol)
    p_pol = [[math.exp(x) for x in row] for row in pol[0].detach().log_softmax(-1).tolist()]
    p_ref = [[math.exp(x) for x in row] for row in ref[0].log_softmax(-1).tolist()]
    hand = torch.tensor([[[a - b for a, b in zip(rp, rr)] for rp, rr in zip(p_pol, p_ref)]], dtype=F64)
    torch.testing.assert_close(grad, hand, rtol=0, atol=1e-12)


def test_frozen_head_and_chunked_kl_with_minus_inf_reference_logits():
    """A −inf in the reference head's bias (a token the reference can never produce) leaves the KL finite and equal
    to the float64 hand computation, in the frozen-head and in the chunked path."""
    torch.manual_seed(5)
    B, T, H, V = 2, 3, 4, 6
    hidden = torch.randn(B, T, H, dtype=F64, requires_grad=True)
    ref_hidden = torch.randn(B, T, H, dtype=F64)
    weight, ref_weight = torch.randn(V, H, dtype=F64), torch.randn(V, H, dtype=F64)
    ref_bias = torch.tensor([0.0, -math.inf, 0.3, -math.inf, 0.0, 0.1], dtype=F64)
    mask = torch.ones(B, T, dtype=torch.bool)
    policy_logits, ref_logits = (hidden @ weight.T).detach(), ref_hidden @ ref_weight.T + ref_bias
    expected = torch.tensor([sum(_kl_by_hand(policy_logits[b], ref_logits[b])) for b in range(B)], dtype=F64)

    frozen = frozen_head_token_kl(hidden, ref_hidden, weight, ref_weight, mask, ref_bias=ref_bias, chunk_size=2)
    torch.testing.assert_close(frozen, expected, rtol=0, atol=1e-12)
    policy_head = torch.nn.Linear(H, V, bias=False, dtype=F64)
    policy_head.weight.data.copy_(weight)
    chunked = chunked_token_kl(hidden, ref_hidden, policy_head, lambda h: h @ ref_weight.T + ref_bias, mask,
                               chunk_size=2)
    torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(frozen.sum(), hidden)
    (chunked_grad,) = torch.autograd.grad(chunked.sum(), hidden)
    torch.testing.assert_close(grad, chunked_grad, rtol=0, atol=1e-12)


class _MatmulShapes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the output shape of every matrix product (mm / addmm) run while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm):
            self.shapes.append(tuple(out.shape))
        return out


def test_frozen_head_token_kl_forms_no_hidden_gradient_under_no_grad():
    """With grad enabled each chunk forms its [rows, H] hidden-state gradient (one mm per chunk); under no_grad none
    is formed (only the two [rows, V] head projections per chunk run) and the value is the same."""
    torch.manual_seed(6)
    B, T, H, V, chunk = 2, 5, 3, 7, 4
    hidden = torch.randn(B, T, H, requires_grad=True)
    ref_hidden, weight, ref_weight = torch.randn(B, T, H), torch.randn(V, H), torch.randn(V, H)
    mask = torch.ones(B, T, dtype=torch.bool)  # 10 rows: 3 chunks of ≤ 4
    with _MatmulShapes() as with_grad:
        value = frozen_head_token_kl(hidden, ref_hidden, weight, ref_weight, mask, chunk_size=chunk)
    assert sorted(s for s in with_grad.shapes if s[-1] == H) == [(2, H), (4, H), (4, H)]
    with torch.no_grad(), _MatmulShapes() as without_grad:
        no_grad_value = frozen_head_token_kl(hidden, ref_hidden, weight, ref_weight, mask, chunk_size=chunk)
    assert [s for s in without_grad.shapes if s[-1] == H] == []
    assert sorted(without_grad.shapes) == sorted([(4, V), (4, V), (4, V), (4, V), (2, V), (2, V)])
    assert no_grad_value.grad_fn is None
    torch.testing.assert_close(no_grad_value, value.detach(), rtol=0, atol=0)


def test_frozen_head_function_called_directly_forms_no_gradient_under_no_grad():
    """The autograd Function itself, given a hidden tensor that requires grad, forms no gradient when the caller
    passes grad mode off (``needs_input_grad`` alone would say True under no_grad)."""
    from prefalign.logprobs import _FrozenHeadTokenKL

    hidden = torch.randn(6, 3, requires_grad=True)
    weight = torch.randn(7, 3)
    with torch.no_grad(), _MatmulShapes() as spy:
        _FrozenHeadTokenKL.apply(hidden, hidden.detach() + 1, weight, None, weight, None, 4, torch.is_grad_enabled())
    assert [s for s in spy.shapes if s[-1] == 3] == []
