"""Every prefalign objective as a pure function over tensors.

No trainer state, no I/O, no model calls: inputs are log-probs, logits, rewards and masks; outputs are tensors.
This module imports only torch and is the single place where the maths of ``shared/specs/METHODS.md`` lives.
Losses are returned per pair (shape [B]); the caller averages.
"""

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------------------------------
# Shared terms
# ---------------------------------------------------------------------------------------------------------------


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: half precision is upcast, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def token_kl(policy_logits: torch.Tensor, ref_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over masked positions of KL(π_ref ‖ π_θ) over the full vocabulary: logits [B,T,V], mask [B,T] → [B].

    Computed with log_softmax in at least float32. Pass detached ``ref_logits``; nothing is detached here.
    """
    dtype = _float_dtype(torch.promote_types(policy_logits.dtype, ref_logits.dtype))
    policy_logp = policy_logits.to(dtype).log_softmax(-1)
    ref_logp = ref_logits.to(dtype).log_softmax(-1)
    kl = (ref_logp.exp() * (ref_logp - policy_logp)).sum(-1)  # [B, T]
    return torch.where(mask.bool(), kl, 0.0).sum(-1)


# ---------------------------------------------------------------------------------------------------------------
# RRPO — METHODS.md §2
# ---------------------------------------------------------------------------------------------------------------


def phrase_rewards(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    phrase_ids: torch.Tensor,
    beta: float,
    num_phrases: int | None = None,
) -> torch.Tensor:
    """Refined reward β·Σ_{t∈phrase k} lr_t of phrases k = 1..K: log-probs [B,T], ids [B,T] → [B,K] (0 if absent).

    K defaults to the largest phrase id in the batch; ids must lie in [0, K].
    """
    if phrase_ids.shape != policy_logps.shape or ref_logps.shape != policy_logps.shape:
        raise ValueError(f"phrase_rewards: shapes differ: policy_logps {tuple(policy_logps.shape)}, "
                         f"ref_logps {tuple(ref_logps.shape)}, phrase_ids {tuple(phrase_ids.shape)}")
    max_id = int(phrase_ids.max()) if phrase_ids.numel() else 0
    num_phrases = max_id if num_phrases is None else num_phrases
    if phrase_ids.numel() and (int(phrase_ids.min()) < 0 or max_id > num_phrases):
        raise ValueError(f"phrase_rewards: phrase ids must lie in [0, {num_phrases}], got "
                         f"[{int(phrase_ids.min())}, {max_id}]")
    log_ratio = policy_logps - ref_logps
    sums = log_ratio.new_zeros(log_ratio.shape[0], num_phrases + 1)
    sums = sums.scatter_add(1, phrase_ids.long(), log_ratio)  # column 0 collects the tokens outside any phrase
    return beta * sums[:, 1:]


def rrpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_phrase_ids: torch.Tensor,
    rejected_phrase_ids: torch.Tensor,
    chosen_kl: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.01,
) -> torch.Tensor:
    """RRPO loss per pair: per-token log-probs and phrase ids [B,T+] / [B,T−], chosen_kl [B] → [B].

    Refined Regularized Preference Optimization (arXiv:2504.12083, METHODS.md §2; official code
    github pritamqu/RRPO, llava/losses.py, class RRPO):
        u = Σ_k [r(x, y+_k) − r(x, y−_k)] = β·(Σ_{t in a phrase of y+} lr_t − Σ_{t in a phrase of y−} lr_t)
        L = −logsigmoid(u) + α·D_TKL(x, y+)
    with lr_t = log π_θ − log π_ref per token (0 at padding), phrase ids 0 outside phrases and k ≥ 1 in phrase k,
    and ``chosen_kl`` the token-wise full-vocabulary KL(π_ref ‖ π_θ) summed over y+ (see ``token_kl``).
    Defaults β = 0.1, α = 0.01 (the official LLaVA-Video setting). A pair with no phrase tokens has u = 0.
    """
    for name, logps, ref, ids in (("chosen", policy_chosen_logps, ref_chosen_logps, chosen_phrase_ids),
                                  ("rejected", policy_rejected_logps, ref_rejected_logps, rejected_phrase_ids)):
        if not logps.shape == ref.shape == ids.shape:
            raise ValueError(f"rrpo_loss: {name} shapes differ: policy {tuple(logps.shape)}, "
                             f"ref {tuple(ref.shape)}, phrase_ids {tuple(ids.shape)}")
    chosen_margin = torch.where(chosen_phrase_ids > 0, policy_chosen_logps - ref_chosen_logps, 0.0).sum(-1)
    rejected_margin = torch.where(rejected_phrase_ids > 0, policy_rejected_logps - ref_rejected_logps, 0.0).sum(-1)
    u = beta * (chosen_margin - rejected_margin)
    return -F.logsigmoid(u) + alpha * chosen_kl
