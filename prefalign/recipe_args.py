"""Command-line and YAML arguments shared by every recipe in ``recipes/``.

A recipe is parsed TRL-style: ``recipes/configs/<method>.yaml`` gives the defaults, ``--config other.yaml``
replaces it, and ``--key value`` overrides any field of the dataclasses (data, training config, model config).
"""

from __future__ import annotations

import contextlib
import importlib.resources
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from trl import TrlParser


def recipes_dir() -> Path:
    """The recipes folder: ``recipes/`` of a source checkout (editable install), else the copy an installed wheel
    ships as ``prefalign/recipes`` (pyproject.toml maps it there, with configs/ and accelerate/)."""
    checkout = Path(__file__).resolve().parent.parent / "recipes"
    if (checkout / "configs").is_dir():
        return checkout
    return Path(str(importlib.resources.files("prefalign") / "recipes"))


RECIPES_DIR = recipes_dir()


@dataclass
class DataArguments:
    """Which preference data a recipe trains and evaluates on."""

    dataset_name: str = field(
        default="wordnet-definitions",
        metadata={"help": "Embedded short name, local jsonl/parquet file or folder, save_to_disk folder, or hub id."},
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (when evaluating)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation rows."})
    drop_invalid: bool = field(
        default=False,
        metadata={"help": "Drop (and count in the log) invalid rows instead of stopping with an error."},
    )
    report: bool = field(
        default=False,
        metadata={"help": "After training, evaluate the base and the trained model on the evaluation split and save "
                          "report.md, report.json and training_curves.png next to the output (prefalign eval's "
                          "metrics, answers side by side, curves)."},
    )
    report_prompts: int = field(default=2, metadata={"help": "Held-out prompts answered by both models in the report."})
    report_max_new_tokens: int = field(default=64, metadata={"help": "Answer length (tokens) in the report."})


def parse_recipe_args(dataclass_types: tuple, recipe: str, argv: list[str] | None = None) -> tuple:
    """Parse ``argv`` (default ``sys.argv[1:]``) into ``dataclass_types`` with ``recipes/configs/<recipe>.yaml``
    as defaults unless ``--config`` is given; on a machine without CUDA, bf16 is turned off unless asked for."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" not in argv:
        argv = ["--config", str(RECIPES_DIR / "configs" / f"{recipe}.yaml"), *argv]
    if not torch.cuda.is_available():  # CPU: no bf16 autocast, and use_cpu so that 2 processes use gloo
        for flag, value in (("--bf16", "false"), ("--use_cpu", "true")):
            if not any(a == flag or a.startswith(flag + "=") for a in argv):
                argv += [flag, value]
    return TrlParser(dataclass_types).parse_args_and_config(argv)


# TRL ModelConfig's quantisation fields (model_load_kwargs refuses any value but ModelConfig's default).
QUANTISATION_FIELDS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
                       "bnb_4bit_quant_storage")
_LATEST = ("true", "last", "latest")  # --resume_from_checkpoint values meaning "the newest checkpoint in output_dir"


def _resume_checkpoint(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint true``: the newest checkpoint in ``output_dir``, or None (train from scratch) while
    there is none, so one command can be resubmitted; a path resumes there."""
    if value is not None and value.lower() in _LATEST:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if Path(output_dir).is_dir() else None
    if value is not None and value.lower() in ("false", "none", ""):
        return None
    return value


def load_recipe_datasets(data_args: DataArguments, processing_class=None, max_length: int | None = None,
                         with_eval: bool = True, required: tuple[str, ...] = ("prompt", "chosen", "rejected")) -> tuple:
    """Load, subsample and validate the train (and, if ``with_eval``, test) splits named by ``data_args``; the
    ``required`` columns must be present.

    Validation runs before any training: bad rows raise an error naming row and column, or are dropped and
    counted when ``data_args.drop_invalid`` is set.
    """
    from prefalign.data import load_preference_dataset, validate_preference_dataset

    splits = [(data_args.dataset_train_split, data_args.max_train_samples)]
    if with_eval:
        splits.append((data_args.dataset_test_split, data_args.max_eval_samples))
    loaded = []
    for split, limit in splits:
        dataset = load_preference_dataset(data_args.dataset_name, split=split, max_samples=limit)
        loaded.append(validate_preference_dataset(dataset, processing_class, max_length=max_length,
                                                  drop_invalid=data_args.drop_invalid, required=required,
                                                  source=f"{data_args.dataset_name}, split {split!r}"))
    return tuple(loaded) if with_eval else (loaded[0], None)


def model_load_kwargs(model_args) -> dict:
    """``from_pretrained`` settings from TRL's ModelConfig: ``dtype`` (float32 when unset), ``attn_implementation``
    and ``revision`` (``--model_revision``). Quantised loading (``--load_in_4bit``, ``--load_in_8bit`` and the
    ``bnb_*`` fields) is refused at start: the recipes' trainers are not tested on bitsandbytes models."""
    from trl import ModelConfig

    from prefalign.trainers.inherited import trl_default

    quantised = {name: getattr(model_args, name) for name in QUANTISATION_FIELDS
                 if getattr(model_args, name) != trl_default(ModelConfig, name)}
    if quantised:
        raise ValueError(f"{', '.join(f'--{k} {v}' for k, v in quantised.items())}: quantised (bitsandbytes) loading "
                         "is not supported by prefalign's recipes; load the model unquantised (LoRA keeps the "
                         "trained weights small) or quantise it yourself and pass the trainer a loaded model")
    return dict(dtype=model_args.dtype or "float32", attn_implementation=model_args.attn_implementation,
                revision=model_args.model_revision)


def load_policy_and_reference(model_args, need_reference: bool = True) -> tuple:
    """(model, ref_model, processing_class, peft_config) for a preference recipe.

    With LoRA (``--use_peft``) the reference is the base model with the adapter disabled, so ``ref_model`` is None;
    otherwise a frozen copy is loaded when ``need_reference`` (not when reference log-probs are precomputed).
    """
    from trl import get_peft_config

    from prefalign.models import load_model, load_processing_class

    model_kwargs = model_load_kwargs(model_args)
    processing_class = load_processing_class(model_args.model_name_or_path, revision=model_args.model_revision)
    model = load_model(model_args.model_name_or_path, **model_kwargs)
    peft_config = get_peft_config(model_args)
    needs_copy = peft_config is None and need_reference
    ref_model = load_model(model_args.model_name_or_path, **model_kwargs) if needs_copy else None
    return model, ref_model, processing_class, peft_config


@contextlib.contextmanager
def whole_on_every_process():
    """Models loaded inside keep whole weights on every process, even under DeepSpeed ZeRO-3.

    For models that no DeepSpeed engine wraps (a reward model or judge used for inference): transformers would
    otherwise partition them at load time (``zero3_init_flag``) and their forward would see empty weights.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps the active ZeRO config only here
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def end_process_group() -> None:
    """Wait for every process, then end the process group (a no-op in one process).

    Called once at the end of a recipe run as a script: a rank that reaches interpreter exit with the group alive can
    abort ("terminate called without an active exception") while another rank still talks to it.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train_and_save(trainer, data_args: DataArguments | None = None, model_args=None):
    """Train (resuming when ``--resume_from_checkpoint`` asks), save to ``output_dir`` with TRL's model card citing the
    trainer's paper, say what was saved, and write the before/after report when ``data_args.report`` is set (the
    base is ``model_args.model_name_or_path``)."""
    args = trainer.args
    if data_args is not None and data_args.report and model_args is None:
        raise ValueError("train_and_save: --report needs the recipe's model arguments (the base model)")
    value = args.resume_from_checkpoint
    checkpoint = _resume_checkpoint(value, args.output_dir)
    if checkpoint is None and value is not None and value.lower() in _LATEST:
        trainer.accelerator.print(f"--resume_from_checkpoint {value}: no checkpoint in {args.output_dir} yet, "
                                  "training from the start")
    trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():  # TRL's model card (README.md): the trainer, its paper and citation
        trainer.create_model_card(model_name=Path(args.output_dir).name)
    kind = "LoRA adapter" if hasattr(trainer.model, "peft_config") else "model"
    trainer.accelerator.print(f"Saved the trained {kind} to {args.output_dir}")
    if data_args is not None and data_args.report and trainer.is_world_process_zero():
        write_recipe_report(trainer, data_args, model_args)
    return trainer


def write_recipe_report(trainer, data_args: DataArguments, model_args) -> dict:
    """``prefalign.evaluation.training_report`` for a finished recipe run: held-out split, base model, β and log
    history taken from the run; prints report.md and says where the files are."""
    from prefalign.evaluation import training_report

    report = training_report(trainer.args.output_dir, model_args.model_name_or_path, data_args.dataset_name,
                             split=data_args.dataset_test_split, max_samples=data_args.max_eval_samples,
                             log_history=trainer.state.log_history, beta=getattr(trainer.args, "beta", 0.1),
                             num_prompts=data_args.report_prompts, max_new_tokens=data_args.report_max_new_tokens,
                             batch_size=trainer.args.per_device_eval_batch_size)
    print(report["markdown"])
    print(f"Saved the report to {Path(trainer.args.output_dir) / 'report.md'} (and report.json"
          f"{', training_curves.png' if report['curves'] else ''})")
    return report
