"""Pairwise generative reward model: a causal LM that answers "1" or "2" for (question, response #1, response #2)
(Pairwise-RL, docs/methods/pairwise_rl.md, arXiv:2504.04950).

    accelerate launch recipes/pairwise_rm.py                                   # embedded model + WordNet pairs, LoRA
    accelerate launch recipes/pairwise_rm.py --max_steps 200 --learning_rate 5e-5
    accelerate launch recipes/pairwise_rm.py --dataset_name my_pairs.jsonl --model_name_or_path <hub id>
    prefalign train pairwise_rm ...                                            # the same script

Data: any preference data set (chosen/rejected, standard or conversational); every pair becomes two verdict examples,
chosen first → "1" and rejected first → "2" (`data_builders.verdicts`). The loss is the cross-entropy of the verdict
token alone. Held-out metrics: accuracy, pair accuracy, position consistency and calibration (ECE, Brier) of
P(#1 ≻ #2). Output: a LoRA adapter (or full model) in output_dir; use it as the reward of recipes/pairwise_ppo.py
with `--reward_model_name_or_path <output_dir>`. Defaults: recipes/configs/pairwise_rm.yaml.
"""

from trl import ModelConfig

from data_builders.verdicts import build_verdict_examples
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
)
from prefalign.trainers.pairwise_rm import PairwiseRMConfig, PairwiseRMTrainer

SUMMARY = ("eval_accuracy", "eval_pair_accuracy", "eval_position_consistency", "eval_ece", "eval_brier")


def main(argv: list[str] | None = None) -> PairwiseRMTrainer:
    data_args, training_args, model_args = parse_recipe_args(
        (DataArguments, PairwiseRMConfig, ModelConfig), "pairwise_rm", argv)

    # The RM is a plain causal LM (its verdict is a token), trained with LoRA or fully.
    model, _, processing_class, peft_config = load_policy_and_reference(model_args, need_reference=False)

    # Data: validated preference pairs, each turned into a verdict example in both orders.
    with_eval = training_args.do_eval or training_args.eval_strategy != "no"
    train_pairs, eval_pairs = load_recipe_datasets(data_args, processing_class, None, with_eval)
    train_dataset = build_verdict_examples(train_pairs)
    eval_dataset = build_verdict_examples(eval_pairs) if eval_pairs is not None else None

    trainer = PairwiseRMTrainer(model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                                processing_class=processing_class, peft_config=peft_config)
    trainer.accelerator.print(f"Training on {len(train_dataset)} verdict examples from {len(train_pairs)} pairs")
    if eval_dataset is not None:
        before = trainer.evaluate()
        trainer.accelerator.print("Held-out before: " + ", ".join(f"{k[5:]} {before[k]:.3f}" for k in SUMMARY))
    train_and_save(trainer, data_args, model_args)
    if eval_dataset is not None:
        after = trainer.evaluate()
        trainer.accelerator.print("Held-out after:  " + ", ".join(f"{k[5:]} {after[k]:.3f}" for k in SUMMARY))
    return trainer


if __name__ == "__main__":
    main()
    end_process_group()
