"""Shared tensor plumbing for the trainers: the full-vocabulary token-wise KL computed from hidden states in chunks,
padding-free packing of a padded batch (and unpacking of per-token values back to the padded layout), and
``completion_log_probs``, the per-token log-probs of a batch's completions through TRL's fused LM head, padded or
packed: the forward of the DPO-family trainers, the diagnostics, the evaluation and the audit builder.

Everything here works on tensors and callables; the objectives themselves live in ``prefalign.losses``.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from prefalign.losses import kl_terms, token_kl

# Config attributes with which transformers models transform the logits after the backbone, each with the values
# that leave them unchanged ("hidden_size": neutral when equal to the config's hidden size). RRPO's KL and prefalign
# eval's KL apply the LM head to the last hidden state directly, so a model with any of them set is refused there.
LOGIT_SCALING_ATTRIBUTES: dict[str, tuple] = {
    "final_logit_softcapping": (None,),  # Gemma 2/3/3n/4, T5Gemma, VaultGemma, Nanochat, Inkling2, Mistral-Large-4
    "logits_soft_cap": (None,),  # RecurrentGemma
    "output_logit_soft_cap": (None,),  # xLSTM
    "logit_scale": (None, 1.0),  # Cohere, Cohere2 (multiplies the logits)
    "output_multiplier": (None, 1.0),  # Muse (multiplies before the soft-cap)
    "lm_head_multiplier": (None, 1.0),  # Falcon-H1
    "logits_scaling": (None, 1.0),  # Granite family and MiniCPM3 divide, HyperCLOVA X multiplies
    "logits_mup_width_multiplier": (None, 1.0),  # Inkling (divides the hidden states)
    "dim_model_base": (None, "hidden_size"),  # MiniCPM (hidden states divided by hidden_size / dim_model_base)
}


def check_unscaled_logits(config, what: str = "RRPO's token-wise KL") -> None:
    """Raise NotImplementedError when ``config`` (or its text config) sets any of ``LOGIT_SCALING_ATTRIBUTES``;
    ``what`` names the computation that applies the LM head to hidden states directly."""
    text_config = config.get_text_config()
    for name, neutral in LOGIT_SCALING_ATTRIBUTES.items():
        value = getattr(text_config, name, None)
        neutral_values = [getattr(text_config, "hidden_size", None) if v == "hidden_size" else v for v in neutral]
        if value not in neutral_values:
            raise NotImplementedError(
                f"{what} applies the LM head to the last hidden state directly, but this model "
                f"transforms its logits ({name}={value!r}): models with logit soft-capping or scaling are not "
                f"supported yet.")



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


@dataclass
class PackedBatch:
    """Sequences of a padded batch packed into rows without padding between them (``pack_sequences``).

    ``input_ids``, ``position_ids`` (restarting at 0 per sequence) and ``labels`` (−100 on prompt tokens, on each
    sequence's first token and on the filler at the end of a row) are [R, W]; ``row``, ``column`` give, for every real
    token of the padded batch in order, its packed place, and ``padded_row``, ``padded_column`` its padded place.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    row: torch.Tensor
    column: torch.Tensor
    padded_row: torch.Tensor
    padded_column: torch.Tensor
    padded_shape: tuple[int, int]


def first_fit_decreasing(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens (first-fit decreasing; ``None``: one
    bin). A length above the capacity gets a bin of its own."""
    if capacity is None:
        return [list(range(len(lengths)))]
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for b, free in enumerate(room):
            if lengths[index] <= free:
                bins[b].append(index)
                room[b] -= lengths[index]
                break
        else:
            bins.append([index])
            room.append(max(capacity, lengths[index]) - lengths[index])
    return [sorted(b) for b in bins]


def pack_sequences(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                   capacity: int | None, pad_token_id: int = 0) -> PackedBatch:
    """Pack the real tokens (``attention_mask`` set, contiguous per row) of a padded batch [N, L] into rows of at most
    ``capacity`` tokens (first-fit decreasing; ``None``: a single row), each sequence keeping its order and restarting
    its positions at 0, so that a causal model given ``position_ids`` and no attention mask attends within each
    sequence only. Labels are the input ids on completion tokens, −100 elsewhere and on each sequence's first token."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1).tolist()
    bins = first_fit_decreasing(lengths, capacity)
    width = max(sum(lengths[i] for i in b) for b in bins)
    device = input_ids.device
    packed_ids = torch.full((len(bins), width), pad_token_id, dtype=input_ids.dtype, device=device)
    labels = torch.full((len(bins), width), -100, dtype=input_ids.dtype, device=device)
    position_ids = torch.zeros((len(bins), width), dtype=torch.long, device=device)
    starts = mask.long().argmax(-1).tolist()
    row = torch.empty(int(sum(lengths)), dtype=torch.long)
    column = torch.empty_like(row)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()[:-1]]) if lengths else torch.zeros(0)
    for b, members in enumerate(bins):
        at = 0
        for i in members:
            n, s = lengths[i], starts[i]
            packed_ids[b, at:at + n] = input_ids[i, s:s + n]
            seq_labels = input_ids[i, s:s + n].masked_fill(completion_mask[i, s:s + n] == 0, -100)
            labels[b, at:at + n] = seq_labels
            labels[b, at] = -100
            position_ids[b, at:at + n] = torch.arange(n, device=device)
            o = int(offsets[i])
            row[o:o + n] = b
            column[o:o + n] = torch.arange(at, at + n)
            at += n
        position_ids[b, at:] = torch.arange(width - at, device=device)  # the filler is a sequence of its own
    padded_row, padded_column = mask.nonzero(as_tuple=True)
    return PackedBatch(packed_ids, position_ids, labels, row.to(device), column.to(device), padded_row,
                       padded_column, tuple(input_ids.shape))


def unpack_per_token(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Per-token values of a packed forward [R, W−1] (entry j scores token j+1) → the padded layout [N, L−1] (entry t
    scores token t+1), zero where the padded batch has no scored token."""
    n, length = packed.padded_shape
    out = values.new_zeros((n, length - 1, *values.shape[2:]))
    scored = packed.position_ids[packed.row, packed.column] > 0  # a sequence's first token: scored by nothing
    out[packed.padded_row[scored], packed.padded_column[scored] - 1] = \
        values[packed.row[scored], packed.column[scored] - 1]
    return out


def unpack_per_position(values: torch.Tensor, packed: PackedBatch) -> torch.Tensor:
    """Per-position values of a packed forward [R, W, ...] (e.g. hidden states) → the padded layout [N, L, ...]."""
    n, length = packed.padded_shape
    out = values.new_zeros((n, length, *values.shape[2:]))
    out[packed.padded_row, packed.padded_column] = values[packed.row, packed.column]
    return out


# ---- completion log-probs of a padded batch, padded or packed (the DPO-family trainers' shared forward) ----

# Batch keys that are not model inputs (the trainers' own columns).
NON_MODEL_KEYS = frozenset({"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_token_logps",
                            "phrase_ids", "row_index", "image_source"})
_PER_TOKEN_FIELDS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@dataclass
class SequenceLogProbs:
    """One forward of a padded batch [N, L]: `per_token` log-probs [N, L−1] (entry t scores token t+1, zero off the
    completion), the model's fused `outputs` with every per-token field in that layout, the last `hidden` states
    [N, L, H] when asked for, and the MoE `aux_loss` when asked for."""

    per_token: torch.Tensor
    outputs: Any
    hidden: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _LastHiddenState:
    """Context manager capturing a backbone's last hidden state during a fused-head forward."""

    def __init__(self, backbone: torch.nn.Module | None):
        self.backbone = backbone
        self.value = None

    def __enter__(self):
        if self.backbone is not None:
            self.handle = self.backbone.register_forward_hook(
                lambda module, args, out: setattr(self, "value", out.last_hidden_state))
        return self

    def __exit__(self, *exc):
        if self.backbone is not None:
            self.handle.remove()


def completion_log_probs(model, inputs: dict[str, Any], packed: bool = False, capacity: int | None = None,
                         pad_token_id: int = 0, backbone: torch.nn.Module | None = None,
                         router_aux_loss: bool = False) -> SequenceLogProbs:
    """Per-token log-probs of the completion tokens of a padded batch (`input_ids`, `attention_mask`,
    `completion_mask` [N, L], plus any other model inputs) through TRL's fused LM head, in the padded layout (see
    `SequenceLogProbs`). ``packed``: the real tokens are packed into rows of at most ``capacity`` tokens (None: one
    row) and the values unpacked. ``backbone``: capture its last hidden states. ``router_aux_loss``: ask an MoE model
    for its load-balancing loss."""
    model_kwargs = {k: v for k, v in inputs.items() if k not in NON_MODEL_KEYS}
    model_kwargs["use_cache"] = False
    if router_aux_loss:
        model_kwargs["output_router_logits"] = True
    completion_mask = inputs["completion_mask"]
    length = completion_mask.size(1)
    layout: PackedBatch | None = None
    if packed:
        extra = set(model_kwargs) - {"input_ids", "attention_mask", "use_cache", "output_router_logits"}
        if extra:
            raise NotImplementedError(f"padding_free=True packs text batches only; this batch also has "
                                      f"{sorted(extra)}: set padding_free=False")
        layout = pack_sequences(inputs["input_ids"], inputs["attention_mask"], completion_mask, capacity,
                                pad_token_id)
        model_kwargs.pop("attention_mask")
        model_kwargs.update(input_ids=layout.input_ids, position_ids=layout.position_ids)
        labels = layout.labels
    else:
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
    with _LastHiddenState(backbone) as hidden:
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
    fields = {name: getattr(outputs, name, None) for name in _PER_TOKEN_FIELDS}
    if layout is None:  # prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens
        fields = {k: None if v is None else v[:, -(length - 1):] for k, v in fields.items()}
        last_hidden = None if hidden.value is None else hidden.value[:, -length:]
    else:
        fields = {k: None if v is None else unpack_per_token(v, layout) for k, v in fields.items()}
        last_hidden = None if hidden.value is None else unpack_per_position(hidden.value, layout)
    outputs = type(outputs)(**{**dict(outputs.items()), **fields})
    return SequenceLogProbs(fields["log_probs"], outputs, last_hidden, getattr(outputs, "aux_loss", None))
