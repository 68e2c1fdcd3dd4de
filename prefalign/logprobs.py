"""Shared tensor plumbing for the trainers: the full-vocabulary token-wise KL computed from hidden states in chunks.

Everything here works on tensors and callables; the objectives themselves live in ``prefalign.losses``.
"""

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.losses import kl_terms, token_kl


def chunked_token_kl(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    policy_head: Callable[[torch.Tensor], torch.Tensor],
    ref_head: Callable[[torch.Tensor], torch.Tensor],
    mask: torch.Tensor,
    chunk_size: int = 128,
    skip_empty_chunks: bool = True,
) -> torch.Tensor:
    """``token_kl(policy_head(policy_hidden), ref_head(ref_hidden), mask)`` → [B], never building [B,T,V] logits.

    Hidden states [B,T,H], mask [B,T]. Positions are processed ``chunk_size`` at a time; each chunk is
    checkpointed, so backward recomputes its logits and peak memory is O(B·chunk_size·V). The reference head runs
    under no_grad. Chunks with no masked position are skipped unless ``skip_empty_chunks=False`` (use that under
    ZeRO-3, where every rank must call the heads the same number of times).
    """
    if chunk_size < 1:
        raise ValueError(f"chunked_token_kl: chunk_size must be ≥ 1, got {chunk_size}")
    if policy_hidden.shape[:2] != mask.shape or ref_hidden.shape[:2] != mask.shape:
        raise ValueError(f"chunked_token_kl: policy_hidden {tuple(policy_hidden.shape)}, ref_hidden "
                         f"{tuple(ref_hidden.shape)} and mask {tuple(mask.shape)} disagree on [B,T]")

    def chunk_kl(policy_chunk: torch.Tensor, ref_chunk: torch.Tensor, mask_chunk: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # inside the checkpoint, so reference logits are not kept alive until backward
            ref_logits = ref_head(ref_chunk)
        return token_kl(policy_head(policy_chunk), ref_logits, mask_chunk)

    total = policy_hidden.new_zeros(mask.shape[0], dtype=torch.promote_types(policy_hidden.dtype, torch.float32))
    for start in range(0, mask.shape[1], chunk_size):
        end = start + chunk_size
        if skip_empty_chunks and not mask[:, start:end].any():
            continue
        total = total + checkpoint(chunk_kl, policy_hidden[:, start:end], ref_hidden[:, start:end],
                                   mask[:, start:end], use_reentrant=False)
    return total


class _FrozenHeadTokenKL(torch.autograd.Function):
    """KL(π_ref ‖ π_θ) per row of hidden states [N,H] under frozen LM heads, with its gradient built in the forward.

    d KL / d logits = softmax(policy logits) − softmax(ref logits), so d KL / d hidden = (p_θ − p_ref) W. Computing
    it chunk by chunk during the forward keeps only an [N,H] gradient instead of any [N,V] logits, and the backward
    needs neither the head nor a recomputation (the heads are frozen, so no weight gradient is due).
    """

    @staticmethod
    def forward(ctx, hidden, ref_hidden, weight, bias, ref_weight, ref_bias, chunk_size, grad_enabled):
        # ``forward`` always runs with grad disabled and ``needs_input_grad`` ignores the caller's grad mode, so the
        # caller passes ``grad_enabled`` (torch.is_grad_enabled() at the call): no gradient is formed under no_grad.
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        kl = hidden.new_empty(hidden.shape[0], dtype=dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] and grad_enabled else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logp = torch.nn.functional.linear(hidden[start:end], weight, bias).to(dtype).log_softmax(-1)
            ref_logp = torch.nn.functional.linear(ref_hidden[start:end], ref_weight, ref_bias).to(dtype).log_softmax(-1)
            kl[start:end] = kl_terms(logp, ref_logp).sum(-1)
            if grad_hidden is not None:
                grad_hidden[start:end] = ((logp.exp() - ref_logp.exp()).to(weight.dtype) @ weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_kl.unsqueeze(-1).to(grad_hidden.dtype) * grad_hidden
        return grad, None, None, None, None, None, None, None


def frozen_head_token_kl(
    policy_hidden: torch.Tensor,
    ref_hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """``token_kl`` from hidden states [B,T,H] through frozen linear heads (weight [V,H]) → [B], memory-light.

    Only masked positions are projected, ``chunk_size`` rows at a time, and the gradient w.r.t. ``policy_hidden``
    is formed during the forward (see ``_FrozenHeadTokenKL``): no [B,T,V] logits are kept and nothing is
    recomputed in the backward. The heads must not require gradients (use ``chunked_token_kl`` for a trained head).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("frozen_head_token_kl: the policy head is trainable; use chunked_token_kl")
    if chunk_size < 1:
        raise ValueError(f"frozen_head_token_kl: chunk_size must be ≥ 1, got {chunk_size}")
    mask = mask.bool()
    rows = mask.nonzero()[:, 0]
    per_position = _FrozenHeadTokenKL.apply(policy_hidden[mask], ref_hidden[mask].detach(), weight.detach(),
                                            None if bias is None else bias.detach(), ref_weight.detach(),
                                            None if ref_bias is None else ref_bias.detach(), chunk_size,
                                            torch.is_grad_enabled())
    return per_position.new_zeros(mask.shape[0]).index_add(0, rows, per_position)
