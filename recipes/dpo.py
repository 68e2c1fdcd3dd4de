"""DPO baseline: stock TRL DPOTrainer, fed through prefalign's model loading and data validation.

    accelerate launch recipes/dpo.py                                   # embedded model and data, LoRA, CPU-friendly
    accelerate launch recipes/dpo.py --max_steps 200 --beta 0.5        # override any field
    accelerate launch recipes/dpo.py --config my.yaml                  # another config
    prefalign train dpo ...                                            # the same script

Defaults: recipes/configs/dpo.yaml. Output: a LoRA adapter (or a full model with --use_peft false) in output_dir,
loadable with plain transformers/peft.
"""

from trl import DPOConfig, DPOTrainer, ModelConfig, get_peft_config

from prefalign.models import load_model, load_processing_class
from prefalign.recipe_args import DataArguments, load_recipe_datasets, parse_recipe_args, resume_checkpoint


def main(argv: list[str] | None = None) -> DPOTrainer:
    data_args, training_args, model_args = parse_recipe_args((DataArguments, DPOConfig, ModelConfig), "dpo", argv)

    # Model, reference and processing class. With LoRA the reference is the base model (adapter disabled);
    # otherwise a frozen copy is loaded, unless reference log-probs are precomputed.
    model_kwargs = dict(dtype=model_args.dtype or "float32", attn_implementation=model_args.attn_implementation)
    processing_class = load_processing_class(model_args.model_name_or_path)
    model = load_model(model_args.model_name_or_path, **model_kwargs)
    peft_config = get_peft_config(model_args)
    needs_ref = peft_config is None and not training_args.precompute_ref_log_probs
    ref_model = load_model(model_args.model_name_or_path, **model_kwargs) if needs_ref else None

    # Data: loaded and validated before any training starts.
    with_eval = training_args.eval_strategy != "no"
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length, with_eval)

    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))
    trainer.save_model(training_args.output_dir)
    kind = "LoRA adapter" if peft_config is not None else "model"
    trainer.accelerator.print(f"Saved the trained {kind} to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
