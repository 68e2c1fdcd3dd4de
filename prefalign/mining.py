"""Noisy-pair statistics, pure functions over tensors: DBPM's loss memory and PLD's within-prompt resampling.

Like ``prefalign.losses`` this module imports only torch and holds no trainer state; the trainers keep the memory and
call these functions. The maths and the adaptation to preference pairs are explained in ``docs/methods/noisy_pairs.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class DBPMStatistics(NamedTuple):
    """Per-pair weighted mean loss ``m`` [P], its population mean ``mu`` and std ``sigma``, and the two flags [P]."""

    m: torch.Tensor
    mu: torch.Tensor
    sigma: torch.Tensor
    noisy: torch.Tensor
    faulty: torch.Tensor


def dbpm_statistics(loss_history: torch.Tensor, max_epochs: int, cut_noisy: float = 2.0,
                    cut_faulty: float = 2.0) -> DBPMStatistics:
    """DBPM's memory statistics after t epochs: per-pair losses ``loss_history`` [P, t] (column e−1 = epoch e) → m, μ, σ.

    Dynamic Bad Pair Mining (Lan et al., "Towards Enhancing Time Series Contrastive Learning: A Dynamic Bad Pair
    Mining Approach", ICLR 2024; official code lanxiang1017/DynamicBadPairMining_ICLR24, models/dbpm_model.py),
    adapted to preference pairs. With E = ``max_epochs`` (the planned number of epochs):
        m_i = (1/t)·Σ_{e=1..t} (e/E)·ℓ_i^(e)      later epochs weigh more
        μ = mean_i m_i,  σ = population std_i m_i
        noisy  (too easy):               m_i ≤ μ − cut_noisy·σ
        faulty (too hard, likely flipped): m_i ≥ μ + cut_faulty·σ
    Official cut-offs: 2 and 2. When σ = 0 every pair has the same history and none is flagged (the formulas would
    otherwise flag every pair and divide by zero in ``dbpm_weights``).
    """
    if loss_history.dim() != 2 or loss_history.shape[1] < 1:
        raise ValueError(f"dbpm_statistics: loss_history must be [P, t] with t ≥ 1, got {tuple(loss_history.shape)}")
    epochs = loss_history.shape[1]
    if max_epochs < epochs:
        raise ValueError(f"dbpm_statistics: max_epochs ({max_epochs}) is smaller than the epochs recorded ({epochs})")
    if not torch.isfinite(loss_history).all():
        raise ValueError("dbpm_statistics: loss_history holds NaN or infinite losses")
    history = loss_history.to(torch.promote_types(loss_history.dtype, torch.float32))
    epoch_weight = torch.arange(1, epochs + 1, dtype=history.dtype, device=history.device) / max_epochs
    m = (history * epoch_weight).mean(-1)
    if bool(m.max() == m.min()):  # exactly equal histories (the float mean/std would leave rounding noise)
        nothing = torch.zeros_like(m, dtype=torch.bool)
        return DBPMStatistics(m, m[0].clone(), m.new_zeros(()), nothing, nothing.clone())
    mu, sigma = m.mean(), m.std(correction=0)
    return DBPMStatistics(m, mu, sigma, m <= mu - cut_noisy * sigma, m >= mu + cut_faulty * sigma)


def dbpm_weights(current_loss: torch.Tensor, flagged: torch.Tensor, mu: float | torch.Tensor,
                 sigma: float | torch.Tensor, weighting: str = "kernel") -> torch.Tensor:
    """Loss weights [B] for the pairs of a batch: 1 when unflagged, a Gaussian of the CURRENT loss when flagged.

    DBPM (see ``dbpm_statistics``) evaluates the weight at the pair's current loss ℓ with the memory's μ and σ:
        "kernel" (default): w = exp(−(ℓ−μ)²/(2σ²)), in (0, 1]
        "pdf" (official):   w = exp(−(ℓ−μ)²/(2σ²)) / (σ·√(2π)), a density that exceeds 1 when σ < 1/√(2π) ≈ 0.4
    The weights carry no gradient.
    """
    if weighting not in ("kernel", "pdf"):
        raise ValueError(f"dbpm_weights: weighting must be 'kernel' or 'pdf', got {weighting!r}")
    if current_loss.shape != flagged.shape:
        raise ValueError(f"dbpm_weights: current_loss {tuple(current_loss.shape)} and flagged "
                         f"{tuple(flagged.shape)} differ")
    loss = current_loss.detach().to(torch.promote_types(current_loss.dtype, torch.float32))
    sigma = torch.as_tensor(sigma, dtype=loss.dtype, device=loss.device)
    if flagged.any() and not sigma > 0:
        raise ValueError(f"dbpm_weights: flagged pairs need sigma > 0, got {float(sigma)}")
    kernel = torch.exp(-((loss - mu) ** 2) / (2 * sigma**2))
    if weighting == "pdf":
        kernel = kernel / (sigma * math.sqrt(2 * math.pi))
    return torch.where(flagged.bool(), kernel, torch.ones_like(loss))


def pld_sampling_probs(losses: torch.Tensor, group_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """PLD-style sampling probabilities [N] of pairs within their prompt groups, from each pair's last-seen loss [N].

    Personalized denoising (Zhang et al., "Personalized Denoising Implicit Feedback for Robust Recommender System",
    WWW 2025), adapted: the "user" is the prompt. Each loss is standardised within its group,
    z_i = (ℓ_i − mean_g)/std_g (population std; z = 0 for a group of one pair or std_g = 0), and
    p_i = exp(−z_i/τ) / Σ_{j in g} exp(−z_j/τ), so a pair abnormally hard FOR ITS PROMPT is drawn less.
    The probabilities of each group sum to 1.
    """
    if temperature <= 0:
        raise ValueError(f"pld_sampling_probs: temperature must be > 0, got {temperature}")
    if losses.dim() != 1 or group_ids.shape != losses.shape:
        raise ValueError(f"pld_sampling_probs: expected two [N] tensors, got {tuple(losses.shape)} and "
                         f"{tuple(group_ids.shape)}")
    loss = losses.detach().to(torch.promote_types(losses.dtype, torch.float32))
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(num_groups, dtype=loss.dtype, device=loss.device).index_add(0, group, torch.ones_like(loss))
    mean = torch.zeros_like(count).index_add(0, group, loss) / count
    centred = loss - mean[group]
    std = (torch.zeros_like(count).index_add(0, group, centred**2) / count).sqrt()
    z = torch.where(std[group] > 0, centred / std[group].clamp_min(torch.finfo(loss.dtype).tiny), 0.0)
    logits = -z / temperature
    group_max = torch.full_like(count, -math.inf).scatter_reduce(0, group, logits, reduce="amax")
    weights = torch.exp(logits - group_max[group])
    return weights / torch.zeros_like(count).index_add(0, group, weights)[group]
