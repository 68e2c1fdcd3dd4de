"""Every prefalign objective as a pure function over tensors.

No trainer state, no I/O, no model calls: inputs are log-probs, logits, rewards and masks; outputs are tensors.
This module imports only torch and is the single place where the maths lives (explained per method in ``docs/methods/``).
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
    Entries the reference gives probability 0 (a −inf logit) contribute exactly 0 (``kl_terms``).
    """
    dtype = _float_dtype(torch.promote_types(policy_logits.dtype, ref_logits.dtype))
    kl = kl_terms(policy_logits.to(dtype).log_softmax(-1), ref_logits.to(dtype).log_softmax(-1)).sum(-1)  # [B, T]
    return torch.where(mask.bool(), kl, 0.0).sum(-1)


def kl_terms(policy_logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """p_ref·(log p_ref − log p_θ) per vocabulary entry, elementwise; exactly 0 where p_ref = 0 (0·log 0 = 0),
    whatever log p_θ is there (also −inf), so a −inf reference logit never makes the KL NaN."""
    ref_p = ref_logp.exp()
    return torch.where(ref_p > 0, ref_p * (ref_logp - policy_logp), 0.0)


# ---------------------------------------------------------------------------------------------------------------
# RRPO — docs/methods/rrpo.md
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RRPO loss per pair: per-token log-probs and phrase ids [B,T+] / [B,T−], chosen_kl [B] → (losses [B],
    chosen_rewards [B], rejected_rewards [B]), the rewards being β·Σ of the phrase tokens' log-ratios of each side.

    Refined Regularized Preference Optimization (arXiv:2504.12083, docs/methods/rrpo.md; official code
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
    chosen_rewards = beta * torch.where(chosen_phrase_ids > 0, policy_chosen_logps - ref_chosen_logps, 0.0).sum(-1)
    rejected_rewards = beta * torch.where(rejected_phrase_ids > 0, policy_rejected_logps - ref_rejected_logps,
                                          0.0).sum(-1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards) + alpha * chosen_kl, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------------------------
# Win-tie Bradley–Terry (SoliReward) — docs/methods/wintie.md
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

    SoliReward (arXiv:2512.22170, docs/methods/wintie.md; official code github lian700/SoliReward,
    solireward/trainer/loss.py). With d = r(a) − r(b), where a is the good side of a win pair, margin m ≥ 0
    (a float or a per-pair tensor [B]) and label smoothing ε:
        win pair:  L_win = −(1−ε)·logsigmoid(d − m) − ε·logsigmoid(−d − m)
        tie pair:  L_tie = −logsigmoid(d − m) − logsigmoid(−d − m)
        loss = mean over pairs of ( w_win·L_win·[not tie] + w_tie·L_tie·[tie] )
    The tie term is symmetric in a and b, minimal at d = 0 with value 2·softplus(m) and zero gradient there.
    Defaults m = 0, w_win = w_tie = 1, ε = 0: with no ties this is TRL's RewardTrainer loss.
    """
    return win_tie_bt_pair_losses(rewards_a, rewards_b, is_tie, margin, win_weight, tie_weight,
                                  label_smoothing).mean()


def win_tie_bt_pair_losses(rewards_a: torch.Tensor, rewards_b: torch.Tensor, is_tie: torch.Tensor,
                           margin: float | torch.Tensor = 0.0, win_weight: float = 1.0, tie_weight: float = 1.0,
                           label_smoothing: float = 0.0) -> torch.Tensor:
    """Each pair's term of ``win_tie_bt_loss`` [B] (w_win·L_win or w_tie·L_tie), before the mean; the per-pair
    loss that noisy-pair mining records for reward models (docs/methods/noisy_pairs.md)."""
    if not rewards_a.shape == rewards_b.shape == is_tie.shape or rewards_a.dim() != 1:
        raise ValueError(f"win_tie_bt_loss: expected three [B] tensors, got rewards_a {tuple(rewards_a.shape)}, "
                         f"rewards_b {tuple(rewards_b.shape)}, is_tie {tuple(is_tie.shape)}")
    d = rewards_a - rewards_b
    up, down = F.logsigmoid(d - margin), F.logsigmoid(-d - margin)
    win = -(1.0 - label_smoothing) * up - label_smoothing * down
    tie = -up - down
    return torch.where(is_tie.bool(), tie_weight * tie, win_weight * win)


# ---------------------------------------------------------------------------------------------------------------
# D²O — docs/methods/d2o.md
# ---------------------------------------------------------------------------------------------------------------


def d2o_loss(
    policy_anchor_logps: torch.Tensor,
    ref_anchor_logps: torch.Tensor,
    policy_negative_logps: torch.Tensor,
    ref_negative_logps: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """D²O loss per prompt: summed sequence log-probs of K anchors [B,K] and of the negative [B] → (losses [B],
    anchor_rewards [B], negative_rewards [B]), the two terms inside the logsigmoid.

    Distributional Dispreference Optimization (arXiv:2403.03419, docs/methods/d2o.md):
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
    anchor_rewards = (beta / num_anchors) * (policy_anchor_logps - ref_anchor_logps).sum(-1)
    negative_rewards = alpha * (policy_negative_logps - ref_negative_logps)
    return -F.logsigmoid(anchor_rewards - negative_rewards), anchor_rewards, negative_rewards


# ---------------------------------------------------------------------------------------------------------------
# Pairwise-RL — docs/methods/pairwise_rl.md
# ---------------------------------------------------------------------------------------------------------------


def pairwise_reward(logits_fwd: torch.Tensor, logits_bwd: torch.Tensor) -> torch.Tensor:
    """Position-consistent pairwise reward of y against an anchor y*, in [0, 1]: verdict logits [B,2], [B,2] → [B].

    Pairwise-RL (arXiv:2504.04950, docs/methods/pairwise_rl.md): with P(#1 ≻ #2) = sigmoid(z_first − z_second) from the two verdict
    logits (columns: first-better, second-better),
        r(y) = ½ · [ P(y ≻ y* | order (y, y*)) + 1 − P(y* ≻ y | order (y*, y)) ]
    where ``logits_fwd`` shows y first and ``logits_bwd`` shows the anchor y* first. A response against itself gives
    exactly ½ when the RM is position-consistent (the same logits in both orders).
    """
    if logits_fwd.dim() != 2 or logits_fwd.shape[-1] != 2 or logits_bwd.shape != logits_fwd.shape:
        raise ValueError(f"pairwise_reward: verdict logits must both be [B, 2], got {tuple(logits_fwd.shape)} and "
                         f"{tuple(logits_bwd.shape)}")
    dtype = _float_dtype(logits_fwd.dtype)
    p_fwd = torch.sigmoid(logits_fwd[:, 0].to(dtype) - logits_fwd[:, 1].to(dtype))
    p_bwd = torch.sigmoid(logits_bwd[:, 0].to(dtype) - logits_bwd[:, 1].to(dtype))
    return 0.5 * (p_fwd + 1.0 - p_bwd)


def round_robin_rewards(pair_rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Each completion's mean pairwise reward against the other K − 1 completions of its prompt: [G, K·(K−1)/2] → [G, K].

    ``pair_rewards[g, p]`` is r(y_i vs y_j) (``pairwise_reward`` with y_i first in the forward order) for the p-th
    pair i < j of ``itertools.combinations(range(K), 2)``; r(y_j vs y_i) = 1 − r(y_i vs y_j) for that position-
    consistent score, so only these K·(K−1)/2 pairs are judged and the mean reward of every group is exactly ½.
    """
    k = num_generations
    if k < 2 or pair_rewards.dim() != 2 or pair_rewards.shape[1] != k * (k - 1) // 2:
        raise ValueError(f"round_robin_rewards: expected [G, {k * (k - 1) // 2}] pair rewards for K={k}, got "
                         f"{tuple(pair_rewards.shape)}")
    first, second = torch.triu_indices(k, k, offset=1, device=pair_rewards.device)  # combinations order
    wins = pair_rewards.new_zeros(pair_rewards.shape[0], k, k)
    wins[:, first, second] = pair_rewards
    wins[:, second, first] = 1.0 - pair_rewards
    return wins.sum(-1) / (k - 1)


# ---------------------------------------------------------------------------------------------------------------
# Margin-disentangled objectives (gradient entanglement) — docs/methods/disentangled.md
# ---------------------------------------------------------------------------------------------------------------


def sequence_rewards(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                      ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit rewards β·(log π(y) − log π_ref(y)) of the chosen and rejected responses: [B] each."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def pngd_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_grad_norms: torch.Tensor,
    rejected_grad_norms: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pairwise normalised gradient descent per pair: summed log-probs [B] and gradient norms [B] → (losses [B],
    chosen_rewards [B], rejected_rewards [B]), the rewards being DPO's β·(log π − log π_ref) of each side.

    Gradient entanglement (arXiv:2410.13828, docs/methods/disentangled.md, design (a)). The VALUE is DPO's −logsigmoid(β·z) with
    z = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)); the GRADIENT is −c·(g_w/‖g_w‖ − g_l/‖g_l‖)
    with c = −m′ = β·sigmoid(−β·z), g = ∇ log π(y), ‖g‖ the given norms (treated as constants), so a descent step moves
    along c·(g_w/‖g_w‖ − g_l/‖g_l‖). To first order Δ log π(y_w) = η·c·‖g_w‖·(1 − cos) ≥ 0 and
    Δ log π(y_l) = −η·c·‖g_l‖·(1 − cos) ≤ 0. Norms are clamped at 1e-12.
    """
    chosen_rewards, rejected_rewards = sequence_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    value = -F.logsigmoid(chosen_rewards - rejected_rewards)
    c = (beta * torch.sigmoid(rejected_rewards - chosen_rewards)).detach()
    direction = policy_chosen_logps / chosen_grad_norms.detach().clamp_min(1e-12) \
        - policy_rejected_logps / rejected_grad_norms.detach().clamp_min(1e-12)
    surrogate = -c * direction
    return value.detach() + surrogate - surrogate.detach(), chosen_rewards.detach(), rejected_rewards.detach()


def masked_margin_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    chosen_mask: torch.Tensor,
    rejected_mask: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss over a token mask per pair: per-token log-probs and mask weights [B,T+] / [B,T−] → (losses [B],
    chosen_rewards [B], rejected_rewards [B]), the rewards being β·r(y) over the mask.

    Sparsity-regularised token masking (arXiv:2410.13828, docs/methods/disentangled.md, design (b)): r(y) = Σ_t m_t·lr_t with
    lr_t = log π_θ − log π_ref, and L = −logsigmoid(β·(r(y_w) − r(y_l))). A mask of 1 on every response token is DPO;
    a sparse mask (the tokens where the two responses differ) leaves out the shared tokens that entangle the two
    gradients. The λ‖m‖₁ penalty of a learned mask is constant for a fixed mask and is therefore not part of this loss.
    """
    for name, logps, ref, mask in (("chosen", policy_chosen_logps, ref_chosen_logps, chosen_mask),
                                   ("rejected", policy_rejected_logps, ref_rejected_logps, rejected_mask)):
        if not logps.shape == ref.shape == mask.shape:
            raise ValueError(f"masked_margin_loss: {name} shapes differ: policy {tuple(logps.shape)}, "
                             f"ref {tuple(ref.shape)}, mask {tuple(mask.shape)}")
    chosen_rewards = beta * (chosen_mask * (policy_chosen_logps - ref_chosen_logps)).sum(-1)
    rejected_rewards = beta * (rejected_mask * (policy_rejected_logps - ref_rejected_logps)).sum(-1)
    return -F.logsigmoid(chosen_rewards - rejected_rewards), chosen_rewards, rejected_rewards


def anchored_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    chosen_anchor: float = 0.0,
    rejected_anchor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separate anchored terms per pair: summed log-probs [B] → (losses [B], chosen_rewards [B],
    rejected_rewards [B]), the rewards being DPO's β·(log π − log π_ref) of each side.

    docs/methods/disentangled.md, design (c) (arXiv:2410.13828): L = −logsigmoid(β·Σlr(y_w) − γ_w) − logsigmoid(−β·Σlr(y_l) − γ_l), so that
    "chosen up" and "rejected down" are each specified on their own rather than only through their gap. With
    γ_w = γ_l = 0 (the defaults) this is TRL 1.16's `loss_type="bco_pair"`.
    """
    chosen_rewards, rejected_rewards = sequence_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    losses = -F.logsigmoid(chosen_rewards - chosen_anchor) - F.logsigmoid(-rejected_rewards - rejected_anchor)
    return losses, chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------------------------------------------
# Mann–Whitney (AUC) loss for scorers with single-item labels — docs/methods/noisy_pairs.md
# ---------------------------------------------------------------------------------------------------------------


def good_bad_pairs(labels: torch.Tensor, group_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every (good, bad) pair within a group: labels [N] (1 good, 0 bad), group ids [N] or None (one group).

    Returns the indices of the good and of the bad item of each pair ([M] each, good-major order) and the number of
    groups that form no pair (no good or no bad item), for the caller to log.
    """
    if labels.dim() != 1 or (group_ids is not None and group_ids.shape != labels.shape):
        raise ValueError(f"good_bad_pairs: expected [N] labels and group ids, got {tuple(labels.shape)} and "
                         f"{None if group_ids is None else tuple(group_ids.shape)}")
    good, bad = labels == 1, labels == 0
    if not (good | bad).all():
        raise ValueError("good_bad_pairs: labels must be 1 (good) or 0 (bad)")
    groups = torch.zeros_like(labels, dtype=torch.long) if group_ids is None else group_ids
    pairs = good[:, None] & bad[None, :] & (groups[:, None] == groups[None, :])
    good_index, bad_index = pairs.nonzero(as_tuple=True)
    unique_groups = torch.unique(groups)
    with_pairs = torch.unique(groups[good_index]) if good_index.numel() else unique_groups[:0]
    return good_index, bad_index, int(unique_groups.numel() - with_pairs.numel())


def mann_whitney_loss(rewards: torch.Tensor, labels: torch.Tensor,
                      group_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mann–Whitney (AUC) loss, the MEAN over good–bad pairs: rewards [N], labels [N] (1 good, 0 bad) → scalar.

    "Optimizing What Matters: AUC-Driven Learning for Robust Neural Retrieval":
        L_MW = (1/|G×B|) · Σ_{g∈G, b∈B} −logsigmoid(r_g − r_b)
    over all good–bad pairs of the same group (``group_ids`` [N], e.g. the prompt; the whole batch when None). Its
    minimiser maximises the Mann–Whitney U statistic, i.e. the AUC. A group with no good or no bad item contributes
    nothing (``good_bad_pairs`` counts such groups); with no pair at all the loss is 0, still attached to the graph.
    """
    if rewards.shape != labels.shape:
        raise ValueError(f"mann_whitney_loss: rewards {tuple(rewards.shape)} and labels {tuple(labels.shape)} differ")
    good_index, bad_index, _ = good_bad_pairs(labels, group_ids)
    if good_index.numel() == 0:
        return rewards.sum() * 0.0
    return -F.logsigmoid(rewards[good_index] - rewards[bad_index]).mean()


def mann_whitney_auc(good: torch.Tensor, bad: torch.Tensor) -> float:
    """P(score of a good item > score of a bad item) + ½·P(equal), from average ranks (Mann–Whitney U)."""
    scores = torch.cat([good, bad]).double()
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based, ties share their mean rank
    rank_sum = average_rank[inverse[: len(good)]].sum().item()
    return (rank_sum - len(good) * (len(good) + 1) / 2) / (len(good) * len(bad))


def dpo_pair_losses(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """DPO's sigmoid loss per pair, −logsigmoid(β·[(log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))]):
    summed sequence log-probs [B] → [B] (Rafailov et al., arXiv:2305.18290; TRL's `loss_type="sigmoid"` averages it).
    The per-pair loss that noisy-pair mining records (docs/methods/noisy_pairs.md)."""
    chosen_rewards, rejected_rewards = sequence_rewards(policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, beta)
    return -F.logsigmoid(chosen_rewards - rejected_rewards)
