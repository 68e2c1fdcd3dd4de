"""Delta learning: DPO on length-normalised log-probs over pairs from a stronger and a weaker model (docs/methods/delta.md,
arXiv:2507.06187).

    accelerate launch recipes/delta_dpo.py                                   # embedded model, 2-rung ladder, LoRA
    accelerate launch recipes/delta_dpo.py --ladder big-model small-model --max_train_samples 2000
    accelerate launch recipes/delta_dpo.py --build_pairs false --dataset_name pairs   # pairs from `prefalign build delta`
    prefalign train delta_dpo ...                                            # the same script

The loss is TRL's own `loss_type: [sigmoid_norm]`: −logsigmoid(β·z) with z the difference of the chosen and rejected
MEAN per-token log-ratios, exactly docs/methods/delta.md (tests/test_delta.py checks it against the formula in float64).
Data: by default the prompts of `dataset_name` (its `prompt_column`) are answered by every rung of `ladder`
(strongest first; `model@temperature=1.5`-style decoding settings allowed) and paired by `data_builders.delta`,
once, into <output_dir>/delta-pairs/: every process generates its share of each shard on its own device and the
main process writes; later runs with the same settings reuse it and an interrupted build resumes. Pairs with an
answer cut off at the token limit are dropped and counted (`--pairs_keep_truncated true` keeps them). With `--build_pairs false`, `dataset_name` is a finished preference set.
Defaults: recipes/configs/delta_dpo.yaml (paper hyper-parameters in its comments). Output: a LoRA adapter (or full
model) in output_dir.
"""

from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import DPOConfig, DPOTrainer, ModelConfig

from data_builders.delta import DEFAULT_LADDER, build_delta_pairs, load_ladder_models
from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
)


@dataclass
class DeltaArguments:
    """How the delta pairs are built from the prompts of `dataset_name` (see data_builders/delta.py)."""

    build_pairs: bool = field(default=True, metadata={"help": "Build pairs from the prompts with the ladder; false: "
                                                              "dataset_name already holds preference pairs."})
    ladder: list[str] = field(default_factory=lambda: list(DEFAULT_LADDER),
                              metadata={"help": "Rungs, strongest first: model or model@key=value,..."})
    min_rung_gap: int = field(default=1, metadata={"help": "Pair rungs at least this far apart."})
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompts."})
    pairs_max_new_tokens: int = field(default=128, metadata={"help": "Longest answer, in tokens (unless a rung sets "
                                                                     "max_new_tokens)."})
    pairs_batch_size: int = field(default=8, metadata={"help": "Prompts per generate call while building."})
    pairs_keep_truncated: bool = field(default=False, metadata={"help": "Keep pairs with an answer cut off at the "
                                                                        "token limit (default: drop, counted)."})


def delta_pairs(data_args: DataArguments, delta_args: DeltaArguments, split: str, limit: int | None,
                loaded_models: dict, processing_class, args: DPOConfig):
    """One split of delta pairs built from the prompts of ``data_args.dataset_name``, cached under output_dir."""
    if is_deepspeed_zero3_enabled():
        raise ValueError("delta_dpo: under DeepSpeed ZeRO-3 the models are partitioned at load time and cannot "
                         "generate the pairs; build them first (`prefalign build delta --output pairs ...`) and pass "
                         "--build_pairs false --dataset_name pairs")
    prompts = load_preference_dataset(data_args.dataset_name, split=split, max_samples=limit)
    # Every process generates its share of each shard; the main process writes the shards and the pairs.
    pairs = build_delta_pairs(prompts, Path(args.output_dir) / "delta-pairs", delta_args.ladder,
                              prompt_column=delta_args.prompt_column, min_rung_gap=delta_args.min_rung_gap,
                              max_new_tokens=delta_args.pairs_max_new_tokens, batch_size=delta_args.pairs_batch_size,
                              seed=args.seed, split=split, loaded_models=loaded_models,
                              keep_truncated=delta_args.pairs_keep_truncated, distributed=True)
    return validate_preference_dataset(pairs, processing_class, max_length=args.max_length,
                                       drop_invalid=data_args.drop_invalid,
                                       source=f"the delta pairs built in {Path(args.output_dir) / 'delta-pairs'}, "
                                              f"split {split!r}")


def main(argv: list[str] | None = None) -> DPOTrainer:
    data_args, delta_args, training_args, model_args = parse_recipe_args(
        (DataArguments, DeltaArguments, DPOConfig, ModelConfig), "delta_dpo", argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled), else a frozen copy.
    model, ref_model, processing_class, peft_config = load_policy_and_reference(model_args)

    # Data: pairs generated once by the ladder (the untrained policy is reused when it is a rung), then validated.
    with_eval = training_args.eval_strategy != "no"
    if delta_args.build_pairs:
        policy = {model_args.model_name_or_path: (model.to(PartialState().device), processing_class)}
        loaded = load_ladder_models(delta_args.ladder, loaded=policy)  # the policy is reused when it is a rung
        splits = [(data_args.dataset_train_split, data_args.max_train_samples)]
        splits += [(data_args.dataset_test_split, data_args.max_eval_samples)] if with_eval else []
        built = [delta_pairs(data_args, delta_args, split, limit, loaded, processing_class, training_args)
                 for split, limit in splits]
        train_dataset, eval_dataset = built[0], built[1] if with_eval else None
    else:
        train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length,
                                                           with_eval)

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    return train_and_save(trainer, data_args, model_args)


if __name__ == "__main__":
    main()
    end_process_group()
