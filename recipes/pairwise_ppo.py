"""Pairwise PPO: policy optimisation whose reward is a pairwise generative RM's probability of beating an anchor
(Pairwise-RL, docs/methods/pairwise_rl.md, arXiv:2504.04950).

    accelerate launch recipes/pairwise_ppo.py                                  # embedded policy + RM, LoRA, CPU
    accelerate launch recipes/pairwise_ppo.py --reward_model_name_or_path outputs/pairwise_rm   # a trained RM
    accelerate launch recipes/pairwise_ppo.py --advantage round_robin          # no anchor: siblings compared
    accelerate launch recipes/pairwise_ppo.py --anchor_column chosen           # the data set's reference answer
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/pairwise_ppo.py   # 2 CPU processes
    prefalign train pairwise_ppo ...                                           # the same script

Data: prompts (TRL's standard or conversational format); preference data works as it is (its `chosen` column can
be the anchor). Anchors: by default the greedy answer of the reference policy (the starting model) to each prompt,
generated once before training. The reward model is a causal LM read as a pairwise judge: the embedded instruct
model by default, or the output of recipes/pairwise_rm.py (LoRA adapters are merged). Logged: TRL's GRPO metrics
(`reward`, `kl`, `clip_ratio/*`) and `pairwise/win_rate` against the anchor. Defaults: recipes/configs/pairwise_ppo.yaml.
"""

from dataclasses import dataclass, field

from trl import ModelConfig

from prefalign.judges.pairwise import PairwiseRewardModel
from prefalign.models import load_model_or_adapter
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
    whole_on_every_process,
)
from prefalign.trainers.pairwise_ppo import PairwisePPOConfig, PairwisePPOTrainer


@dataclass
class RewardModelArguments:
    """Which pairwise generative RM scores the samples."""

    reward_model_name_or_path: str = field(
        default="smollm2-135m-instruct",
        metadata={"help": "Short name, hub id, full model or LoRA adapter folder (from recipes/pairwise_rm.py)."})


def main(argv: list[str] | None = None) -> PairwisePPOTrainer:
    data_args, rm_args, training_args, model_args = parse_recipe_args(
        (DataArguments, RewardModelArguments, PairwisePPOConfig, ModelConfig), "pairwise_ppo", argv)

    # Policy (LoRA by default: the reference is the base model with the adapter disabled) and the pairwise RM.
    dtype = model_args.dtype or "float32"
    model, _, processing_class, peft_config = load_policy_and_reference(model_args, need_reference=False)
    with whole_on_every_process():  # the RM is no DeepSpeed engine's: never partitioned, even under ZeRO-3
        reward_model = PairwiseRewardModel(*load_model_or_adapter(rm_args.reward_model_name_or_path, dtype=dtype))

    # Prompts: only `prompt` (and the anchor column, when one is named) are used; rows are validated first.
    with_eval = training_args.eval_strategy != "no"
    required = ("prompt",) if training_args.anchor_column is None else ("prompt", training_args.anchor_column)
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, None, with_eval, required)

    trainer = PairwisePPOTrainer(model, reward_model, args=training_args, train_dataset=train_dataset,
                                 eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config)
    trainer.accelerator.print(f"Pairwise PPO on {len(trainer.train_dataset)} prompts, advantage "
                              f"{training_args.advantage}, {training_args.num_generations} samples per prompt")
    return train_and_save(trainer, data_args, model_args)


if __name__ == "__main__":
    main()
    end_process_group()
