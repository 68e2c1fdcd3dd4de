"""Tiny random models, a test fixture: a Qwen2 causal LM and a Qwen2-VL, each with a locally trained tokenizer.

``register_tiny_models()`` (called by conftest.py, and by the test scripts that run in their own processes) makes
``tiny-causal-lm`` and ``tiny-qwen2-vl`` short names of ``prefalign.models``: built once into the prefalign cache,
then loaded like any checkpoint. A recipe launched in a subprocess does not run that registration: pass it
``tiny_model_path(name)``, the built folder, instead of the short name. Weights are random (seed 0): only shapes,
plumbing and maths are meaningful, never the text they generate.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from prefalign.data import EMBEDDED_DATASETS, iter_json_lines
from prefalign.models import PilQwen2VLProcessor, build_cached, register_model_builder

HIDDEN = 64
VOCAB_SIZE = 1024
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def _training_texts() -> list[str]:
    """Text to fit the tiny tokenizer on: the embedded WordNet data set (real English)."""
    folder = EMBEDDED_DATASETS["wordnet-definitions"]
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        for row in iter_json_lines(path):
            texts += [m["content"] for key in ("prompt", "chosen", "rejected") for m in row[key]]
    return texts or ["What does the word mean? A definition of a word."]


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (1,024 tokens) with a ChatML chat template, trained on the embedded data."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_texts(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    )


def _text_config(tokenizer) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def build_tiny_causal_lm(folder: Path) -> None:
    """Write a random Qwen2 causal LM (hidden 64, 2 layers) and its tokenizer to ``folder``."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**_text_config(tokenizer)))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_tiny_qwen2_vl(folder: Path) -> None:
    """Write a random Qwen2-VL (text hidden 64, vision depth 2) with a torchvision-free processor to ``folder``."""
    tokenizer = build_tiny_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = _text_config(tokenizer) | {"rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    vision = dict(depth=2, embed_dim=32, hidden_size=HIDDEN, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)
    PilQwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                        chat_template=CHATML_TEMPLATE).save_pretrained(folder)


BUILDERS = {"tiny-causal-lm": build_tiny_causal_lm, "tiny-qwen2-vl": build_tiny_qwen2_vl}


def register_tiny_models() -> None:
    """Make ``tiny-causal-lm`` and ``tiny-qwen2-vl`` short names of ``prefalign.models`` in this process."""
    for name, build in BUILDERS.items():
        register_model_builder(name, build)


def tiny_model_path(name: str) -> str:
    """The folder of tiny model ``name`` (built into the cache on first use), for processes that do not register it."""
    return str(build_cached(name, BUILDERS[name]))
