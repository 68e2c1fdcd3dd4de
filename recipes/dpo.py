"""DPO (arXiv:2305.18290, docs/methods/dpo.md) with prefalign's `PackedDPOTrainer`: TRL's DPOTrainer (any TRL
`loss_type`) on prefalign's shared forward, so `--padding_free true` packs each micro-batch, plus noisy-pair mining
(`--pair_mining dbpm|pld`, docs/methods/noisy_pairs.md); fed through prefalign's model loading and data validation.

    accelerate launch recipes/dpo.py                                   # embedded model and data, LoRA, CPU-friendly
    accelerate launch recipes/dpo.py --max_steps 200 --beta 0.5        # override any field
    accelerate launch recipes/dpo.py --loss_type ipo --padding_free true
    accelerate launch recipes/dpo.py --pair_mining dbpm --mining_warmup_epochs 1 --max_steps -1 --num_train_epochs 3
    accelerate launch recipes/dpo.py --config my.yaml                  # another config
    prefalign train dpo ...                                            # the same script

Defaults: recipes/configs/dpo.yaml. Every `trl.DPOConfig` field is accepted and honoured as by TRL's DPOTrainer.
Output: a LoRA adapter (or a full model with --use_peft false) in output_dir, loadable with plain transformers/peft.
"""

from trl import ModelConfig

from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
)
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer


def main(argv: list[str] | None = None) -> PackedDPOTrainer:
    data_args, training_args, model_args = parse_recipe_args((DataArguments, PackedDPOConfig, ModelConfig), "dpo",
                                                             argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled); otherwise a frozen copy,
    # unless reference log-probs are precomputed.
    model, ref_model, processing_class, peft_config = load_policy_and_reference(
        model_args, need_reference=not training_args.precompute_ref_log_probs)

    # Data: loaded and validated before any training starts.
    with_eval = training_args.eval_strategy != "no"
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length, with_eval)

    trainer = PackedDPOTrainer(
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
