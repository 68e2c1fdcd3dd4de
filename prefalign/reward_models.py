"""Reward models: the query-attention reward head (SoliReward, arXiv:2512.22170; docs/methods/wintie.md), a
sequence-classification Qwen2-VL, and loading any reward model — full folder or LoRA adapter — with its head.

The last-token head is the model's own sequence-classification head, so such a checkpoint loads with
``AutoModelForSequenceClassification.from_pretrained``. A query-attention head is saved next to the model (or the
adapter) as ``reward_head.safetensors`` + ``reward_head.json``; ``load_reward_model`` attaches it, and the model's
forward then returns the head's reward in ``.logits`` like any reward model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel, Qwen2VLConfig
from transformers.modeling_layers import GenericForSequenceClassification
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLPreTrainedModel

from prefalign.models import adapter_base, load_processing_class, resolve_model_path

HEAD_CONFIG = "reward_head.json"
HEAD_WEIGHTS = "reward_head.safetensors"
HEAD_ATTRIBUTE = "query_attention_head"


class QueryAttentionRewardHead(nn.Module):
    """Hierarchical progressive query attention (SoliReward): per-layer queries, a final query, an MLP read-out."""

    def __init__(self, hidden_size: int, layers: list[int], num_heads: int = 8):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"head_num_heads={num_heads} must divide the hidden size {hidden_size}")
        self.layers = list(layers)
        self.layer_queries = nn.Parameter(0.02 * torch.randn(len(self.layers), hidden_size))
        self.layer_attention = nn.ModuleList(
            nn.MultiheadAttention(hidden_size, num_heads, batch_first=True) for _ in self.layers)
        self.final_query = nn.Parameter(0.02 * torch.randn(1, hidden_size))
        self.final_attention = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.readout = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                     nn.Linear(hidden_size, 1, bias=False))

    def forward(self, hidden_states: tuple[torch.Tensor, ...], attention_mask: torch.Tensor) -> torch.Tensor:
        """Rewards [B] from the model's hidden states (a tuple of [B, T, H]) and its attention mask [B, T]."""
        padding = ~attention_mask.bool()
        batch = attention_mask.shape[0]
        summaries = []
        for query, attention, layer in zip(self.layer_queries, self.layer_attention, self.layers):
            states = hidden_states[layer].to(query.dtype)
            summary, _ = attention(query.expand(batch, 1, -1), states, states, key_padding_mask=padding,
                                   need_weights=False)
            summaries.append(summary)
        summaries = torch.cat(summaries, dim=1)  # [B, layers, H]
        pooled, _ = self.final_attention(self.final_query.expand(batch, 1, -1), summaries, summaries,
                                         need_weights=False)
        return self.readout(pooled[:, 0]).squeeze(-1)


def _ask_hidden_states(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: the query-attention head needs every layer's hidden states."""
    return args, {**kwargs, "output_hidden_states": True}


def _query_attention_logits(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Forward hook: replace the last-token logits [B, 1] with the query-attention head's rewards."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is None:
        mask = torch.ones(output.hidden_states[-1].shape[:2], dtype=torch.bool, device=output.logits.device)
    output.logits = getattr(module, HEAD_ATTRIBUTE)(output.hidden_states, mask).unsqueeze(-1).to(output.logits.dtype)
    return output


def add_query_attention_head(model: PreTrainedModel, layers: list[int], num_heads: int = 8
                             ) -> QueryAttentionRewardHead:
    """Attach a query-attention head as `model.query_attention_head`; the model's forward then returns its rewards.

    The head is a submodule, so optimisers, DDP, ZeRO and `state_dict` see it; hooks make the model's own forward
    compute it (inside the forward, as distributed wrappers require).
    """
    text_config = model.config.get_text_config()
    num_layers = text_config.num_hidden_layers + 1  # hidden states: embeddings, then one per layer
    bad = [layer for layer in layers if not -num_layers <= layer < num_layers]
    if bad:
        raise ValueError(f"head_layers {bad} out of range: the model has {num_layers} hidden states")
    weight = next(model.parameters())
    head = QueryAttentionRewardHead(text_config.hidden_size, layers, num_heads).to(weight.device, weight.dtype)
    model.add_module(HEAD_ATTRIBUTE, head)
    model.register_forward_pre_hook(_ask_hidden_states, with_kwargs=True)
    model.register_forward_hook(_query_attention_logits, with_kwargs=True)
    return head


def query_attention_head(model: nn.Module) -> QueryAttentionRewardHead | None:
    """The query-attention head of a (possibly wrapped) model, or None for the last-token head."""
    for name, module in model.named_modules():
        if isinstance(module, QueryAttentionRewardHead) and "original_module" not in name:
            return module
    return None


class Qwen2VLForSequenceClassification(GenericForSequenceClassification, Qwen2VLPreTrainedModel):
    """Qwen2-VL with a linear head on the last non-padding token (transformers ships no such class); images go in
    as `pixel_values` + `image_grid_thw`. Registered with AutoModelForSequenceClassification on import."""


AutoModelForSequenceClassification.register(Qwen2VLConfig, Qwen2VLForSequenceClassification, exist_ok=True)
# transformers renames Qwen2-VL checkpoint keys by class name; give ours the renaming of the generation class.
QWEN2_VL_KEY_MAPPING = {r"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}


def _attach_saved_head(model: PreTrainedModel, folder: Path) -> None:
    """Attach the query-attention head saved in ``folder`` (``reward_head.json`` + weights), if there is one."""
    if (folder / HEAD_CONFIG).is_file():
        settings = json.loads((folder / HEAD_CONFIG).read_text())
        head = add_query_attention_head(model, settings["layers"], settings["num_heads"])
        head.load_state_dict(safetensors.torch.load_file(str(folder / HEAD_WEIGHTS)))


def load_reward_model(name_or_path: str, **kwargs) -> PreTrainedModel:
    """A reward model with one output (short name, hub id, full folder, or LoRA adapter folder merged into its base;
    text or Qwen2-VL), with its query-attention head when `reward_head.json` lies next to the weights or the
    adapter. `kwargs` go to `from_pretrained`."""
    base = adapter_base(name_or_path)
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_reward_model(base, **kwargs), name_or_path).merge_and_unload()
        _attach_saved_head(model, Path(name_or_path))
        return model
    path = resolve_model_path(name_or_path)
    if AutoConfig.from_pretrained(path).model_type == "qwen2_vl":
        kwargs.setdefault("key_mapping", QWEN2_VL_KEY_MAPPING)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    text_config = model.config.get_text_config()
    if text_config.pad_token_id is None:
        processing_class = load_processing_class(name_or_path)
        text_config.pad_token_id = getattr(processing_class, "tokenizer", processing_class).pad_token_id
    _attach_saved_head(model, Path(path))
    return model


def load_reward_model_and_processor(name_or_path: str, **kwargs) -> tuple[PreTrainedModel, Any]:
    """``load_reward_model`` and the matching processing class (the base's for an adapter folder)."""
    return load_reward_model(name_or_path, **kwargs), load_processing_class(adapter_base(name_or_path) or name_or_path)


def is_reward_model(name_or_path: str) -> bool:
    """Whether a folder or name holds a sequence-classification model (or a SEQ_CLS LoRA adapter)."""
    adapter = Path(name_or_path) / "adapter_config.json"
    if adapter.is_file():
        return json.loads(adapter.read_text()).get("task_type") == "SEQ_CLS"
    architectures = AutoConfig.from_pretrained(resolve_model_path(name_or_path)).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)
