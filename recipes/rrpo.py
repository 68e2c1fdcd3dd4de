"""RRPO: refined phrase-level rewards with a token-wise KL penalty (docs/methods/rrpo.md, arXiv:2504.12083).

    accelerate launch recipes/rrpo.py                                  # embedded model + phrase pairs, LoRA, CPU
    accelerate launch recipes/rrpo.py --alpha 0.05 --beta 0.5          # override any field
    accelerate launch --config_file recipes/accelerate/zero3.yaml recipes/rrpo.py --model_name_or_path <hub id>
    prefalign train rrpo ...                                           # the same script

Data: preference rows whose completions mark the differing phrases with <MASK>…</MASK> (the official format), or
untagged pairs (phrases come from a token diff). Image columns (`images`) and videos as frame lists (`video`) go to
the model's processor. Defaults: recipes/configs/rrpo.yaml. Output: a LoRA adapter (or full model) in output_dir.
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
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer


def main(argv: list[str] | None = None) -> RRPOTrainer:
    data_args, training_args, model_args = parse_recipe_args((DataArguments, RRPOConfig, ModelConfig), "rrpo", argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled), else a frozen copy.
    model, ref_model, processing_class, peft_config = load_policy_and_reference(model_args)

    # Data: validated before training; phrases are aligned with tokens inside the trainer (unaligned pairs reported).
    with_eval = training_args.eval_strategy != "no"
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length, with_eval)

    trainer = RRPOTrainer(
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
