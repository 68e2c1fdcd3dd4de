"""Every prefalign objective as a pure function over tensors.

No trainer state, no I/O, no model calls: inputs are log-probs, logits, rewards and masks; outputs are tensors.
This module imports only torch and is the single place where the maths of ``shared/specs/METHODS.md`` lives.
Losses are returned per pair (shape [B]) for the caller to average, unless a docstring says otherwise.
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


# ---------------------------------------------------------------------------------------------------------------
# Win-tie Bradley–Terry (SoliReward) — METHODS.md §1
# ---------------------------------------------------------------------------------------------------------------


def win_tie_bt_loss(
    rewards_a: torch.Tensor,
    rewards_b: torch.Tensor,
    is_tie: torch.Tensor,
    margin: float | torch.Tensor = 0.0,
    win_weight: float = 1.0,
    tie_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Win-tie Bradley–Terry loss, the MEAN over pairs: rewards [B], is_tie [B] (bool) → scalar.

    SoliReward (arXiv:2512.22170, METHODS.md §1; official code github lian700/SoliReward,
    solireward/trainer/loss.py). With d = r(a) − r(b), where a is the good side of a win pair, margin m ≥ 0
    (a float or a per-pair tensor [B]) and label smoothing ε:
        win pair:  L_win = −(1−ε)·logsigmoid(d − m) − ε·logsigmoid(−d − m)
        tie pair:  L_tie = −logsigmoid(d − m) − logsigmoid(−d − m)
        loss = mean over pairs of ( w_win·L_win·[not tie] + w_tie·L_tie·[tie] )
    The tie term is symmetric in a and b, minimal at d = 0 with value 2·softplus(m) and zero gradient there.
    Defaults m = 0, w_win = w_tie = 1, ε = 0: with no ties this is TRL's RewardTrainer loss.
    """
    if not rewards_a.shape == rewards_b.shape == is_tie.shape or rewards_a.dim() != 1:
        raise ValueError(f"win_tie_bt_loss: expected three [B] tensors, got rewards_a {tuple(rewards_a.shape)}, "
                         f"rewards_b {tuple(rewards_b.shape)}, is_tie {tuple(is_tie.shape)}")
    d = rewards_a - rewards_b
    up, down = F.logsigmoid(d - margin), F.logsigmoid(-d - margin)
    win = -(1.0 - label_smoothing) * up - label_smoothing * down
    tie = -up - down
    return torch.where(is_tie.bool(), tie_weight * tie, win_weight * win).mean()


# ---------------------------------------------------------------------------------------------------------------
# D²O — METHODS.md §3
# ---------------------------------------------------------------------------------------------------------------


def d2o_loss(
    policy_anchor_logps: torch.Tensor,
    ref_anchor_logps: torch.Tensor,
    policy_negative_logps: torch.Tensor,
    ref_negative_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> torch.Tensor:
    """D²O loss per prompt: summed sequence log-probs of K anchors [B,K] and of the negative [B] → [B].

    Distributional Dispreference Optimization (arXiv:2403.03419, METHODS.md §3):
        L = −logsigmoid( (β/K)·Σ_{i=1..K} [log π_θ(y_i|x) − log π_r−(y_i|x)] − α·[log π_θ(y_l|x) − log π_r+(y_l|x)] )
    with y_1..y_K self-generated anchors, y_l the human negative, ``ref_anchor_logps`` = log π_r− and
    ``ref_negative_logps`` = log π_r+. Every log-prob is a SUM over the response's tokens, and the anchor term is
    divided by K exactly once (β/K times the sum, not β/K times a mean). The "implicit Jeffrey divergence" comes from
    this objective in expectation; it is not an extra term. Defaults β = 0.1, α = 0.1 (a public reproduction).
    """
    if policy_anchor_logps.dim() != 2 or ref_anchor_logps.shape != policy_anchor_logps.shape:
        raise ValueError(f"d2o_loss: anchor log-probs must both be [B, K], got policy "
                         f"{tuple(policy_anchor_logps.shape)}, ref {tuple(ref_anchor_logps.shape)}")
    expected = policy_anchor_logps.shape[:1]
    if policy_negative_logps.shape != expected or ref_negative_logps.shape != expected:
        raise ValueError(f"d2o_loss: negative log-probs must both be [B] = {tuple(expected)}, got policy "
                         f"{tuple(policy_negative_logps.shape)}, ref {tuple(ref_negative_logps.shape)}")
    num_anchors = policy_anchor_logps.shape[1]
    anchor_term = (beta / num_anchors) * (policy_anchor_logps - ref_anchor_logps).sum(-1)
    negative_term = alpha * (policy_negative_logps - ref_negative_logps)
    return -F.logsigmoid(anchor_term - negative_term)
