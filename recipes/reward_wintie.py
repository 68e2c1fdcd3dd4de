"""Win-tie reward modelling over cross-prompt pairs (SoliReward, docs/methods/wintie.md, arXiv:2512.22170).

    accelerate launch recipes/reward_wintie.py                                  # MiniLM + WordNet items, CPU
    accelerate launch recipes/reward_wintie.py --tie_ratio 0 --margin 0         # plain Bradley–Terry, no ties
    accelerate launch recipes/reward_wintie.py --reward_head query_attention    # SoliReward's query-attention head
    accelerate launch recipes/reward_wintie.py --loss_type mann_whitney --margin 0  # MW loss on single items
    accelerate launch recipes/reward_wintie.py --pair_mining dbpm --num_train_epochs 3 --max_steps -1  # noisy pairs
    accelerate launch recipes/reward_wintie.py --model_name_or_path Qwen/Qwen2-VL-2B-Instruct --dataset_name pairs/  # a VLM
    prefalign train reward_wintie ...                                           # the same script

Data (`dataset_name`): preference pairs {prompt, chosen, rejected} are split into single items (chosen = good,
rejected = bad) and re-paired ACROSS prompts; items {prompt, completion, label} are paired directly; a dataset that
already has `is_tie` (from `prefalign build cross-prompt`, images allowed) is used as it is. Output: the reward
model in output_dir; with the query-attention head also reward_head.{json,safetensors} (load with
`prefalign.reward_models.load_reward_model`).
"""

from dataclasses import dataclass, field

from trl import ModelConfig, get_peft_config

from data_builders.cross_prompt import (
    build_cross_prompt_pairs,
    items_from_preference_pairs,
    pair_kind_counts,
    pairs_as_text,
)
from prefalign.data import check_reward_pair_lengths, load_preference_dataset, validate_preference_dataset
from prefalign.models import load_processing_class
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    model_load_kwargs,
    parse_recipe_args,
    train_and_save,
)
from prefalign.reward_models import load_reward_model
from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer


@dataclass
class CrossPromptArguments:
    """How single items are paired across prompts (see data_builders/cross_prompt.py)."""

    pairs_per_item: int = field(default=2, metadata={"help": "Pairs anchored by each good item."})
    tie_ratio: float = field(default=0.5, metadata={"help": "Fraction of those pairs that are good-good ties."})
    bad_bad_ties: bool = field(default=False, metadata={"help": "Also build ties between two bad items."})
    pair_seed: int = field(default=0, metadata={"help": "Seed of the pairing."})


def cross_prompt_pairs(data_args, pair_args, split: str, limit: int | None, as_text: bool, seed: int,
                       items_only: bool = False):
    """Load one split and turn it into cross-prompt win/tie pairs (unless it already is), or with `items_only`
    into single items {prompt, completion, label} for the Mann–Whitney loss."""
    data = load_preference_dataset(data_args.dataset_name, split=split, max_samples=limit)
    if "is_tie" in data.column_names:
        if items_only:
            raise ValueError(f"{data_args.dataset_name}: loss_type='mann_whitney' needs single items or preference "
                             "pairs, not cross-prompt pairs (it has an 'is_tie' column)")
        return pairs_as_text(data) if as_text else data
    if "completion" not in data.column_names:
        data = validate_preference_dataset(data, drop_invalid=data_args.drop_invalid,
                                           source=f"{data_args.dataset_name}, split {split!r}")
        data = items_from_preference_pairs(data, as_text=as_text)
    if items_only:
        return data
    return build_cross_prompt_pairs(data, pair_args.pairs_per_item, pair_args.tie_ratio, seed=seed,
                                    bad_bad_ties=pair_args.bad_bad_ties)


def main(argv: list[str] | None = None) -> WinTieRewardTrainer:
    data_args, pair_args, training_args, model_args = parse_recipe_args(
        (DataArguments, CrossPromptArguments, WinTieRewardConfig, ModelConfig), "reward_wintie", argv)

    # Reward model: the backbone with one output (last-token head; the query-attention head is added by the trainer).
    processing_class = load_processing_class(model_args.model_name_or_path, revision=model_args.model_revision)
    model = load_reward_model(model_args.model_name_or_path, **model_load_kwargs(model_args))
    peft_config = get_peft_config(model_args)
    if peft_config is not None:  # a reward model is a sequence classifier: PEFT then also trains its score head
        peft_config.task_type = "SEQ_CLS"

    # Data: a backbone without a chat template (MiniLM) reads the conversations as plain text.
    as_text = getattr(processing_class, "chat_template", None) is None
    items = training_args.loss_type == "mann_whitney"
    train_dataset = cross_prompt_pairs(data_args, pair_args, data_args.dataset_train_split,
                                       data_args.max_train_samples, as_text, pair_args.pair_seed, items)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = cross_prompt_pairs(data_args, pair_args, data_args.dataset_test_split,
                                          data_args.max_eval_samples, as_text, pair_args.pair_seed + 1, items)
    if items:  # the trainer checks the items' lengths (an error naming the rows)
        trainer = WinTieRewardTrainer(model, args=training_args, train_dataset=train_dataset,
                                      eval_dataset=eval_dataset, processing_class=processing_class,
                                      peft_config=peft_config)
        trainer.accelerator.print(f"Training on {len(train_dataset)} single items (Mann–Whitney loss)")
        train_and_save(trainer, data_args, model_args)
        if eval_dataset is not None:
            trainer.accelerator.print(f"Held-out: auc {trainer.evaluate()['eval_auc']:.3f}")
        return trainer
    # Pairs over max_length (which TRL would drop uncounted): an error naming them, or with --drop_invalid counted.
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    train_dataset = check_reward_pair_lengths(train_dataset, tokenizer, training_args.max_length, data_args.drop_invalid,
                                              f"{data_args.dataset_name}, split {data_args.dataset_train_split!r}")
    if eval_dataset is not None:
        eval_dataset = check_reward_pair_lengths(eval_dataset, tokenizer, training_args.max_length,
                                                 data_args.drop_invalid,
                                                 f"{data_args.dataset_name}, split {data_args.dataset_test_split!r}")
    trainer = WinTieRewardTrainer(model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                  processing_class=processing_class, peft_config=peft_config)
    counts = ", ".join(f"{n} {kind}" for kind, n in pair_kind_counts(train_dataset).items())
    trainer.accelerator.print(f"Training on {len(train_dataset)} cross-prompt pairs: {counts}")

    train_and_save(trainer, data_args, model_args)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.accelerator.print("Held-out: " + ", ".join(
            f"{k.removeprefix('eval_')} {metrics[k]:.3f}" for k in ("eval_auc", "eval_win_accuracy",
                                                                    "eval_tie_abs_diff", "eval_good_reward_std")))
    return trainer

if __name__ == "__main__":
    main()
    end_process_group()
