"""D²O: alignment from human negatives only, against self-generated anchors (METHODS.md §3, arXiv:2403.03419).

    accelerate launch recipes/d2o.py                                      # embedded model + WordNet negatives, LoRA
    accelerate launch recipes/d2o.py --num_anchors 8 --alpha 0.2          # override any field
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/d2o.py   # 2 processes
    prefalign train d2o ...                                               # the same script

Data: rows with a `prompt` and a human negative `rejected`. The default is the embedded wordnet-definitions set,
where the rejected answer is another word's definition (its `chosen` column is not used). Unless the rows already
carry `anchors`, K anchors per prompt are sampled once from the untrained (reference) model into
<output_dir>/anchors/<split>.jsonl by the main process; later runs with the same settings reuse that file, and an
interrupted build resumes. Under DeepSpeed ZeRO-3 build the anchors first (`prefalign build anchors`) and pass the
file as --dataset_name: the model is partitioned at load time and cannot sample here.
After `anchor_warmup_steps` the trainer samples new anchors from the policy every `anchor_refresh_steps` steps.
Defaults: recipes/configs/d2o.yaml. Output: a LoRA adapter (or full model) in output_dir.
"""

from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from trl import ModelConfig, get_peft_config

from data_builders.negatives import build_anchors
from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.models import load_model, load_processing_class
from prefalign.recipe_args import DataArguments, parse_recipe_args, resume_checkpoint
from prefalign.trainers.d2o import D2OConfig, D2OTrainer


def load_negatives(data_args: DataArguments, split: str, limit: int | None, processing_class, max_length) -> Dataset:
    """One split of prompts with human negatives, subsampled and validated (bad rows named, or dropped and counted)."""
    dataset = load_preference_dataset(data_args.dataset_name, split=split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return validate_preference_dataset(dataset, processing_class, max_length=max_length,
                                       drop_invalid=data_args.drop_invalid, required=("prompt", "rejected"))


def with_anchors(dataset: Dataset, split: str, model, processing_class, args: D2OConfig) -> Dataset:
    """The rows with K anchors each: as given, or sampled from ``model`` once and cached under output_dir."""
    if "anchors" in dataset.column_names:
        return dataset
    path = Path(args.output_dir) / "anchors" / f"{split}.jsonl"
    with PartialState().main_process_first():  # the main process samples; the others find the finished file
        return build_anchors(dataset, path, model=model, processing_class=processing_class,
                             num_anchors=args.num_anchors, instruction=args.anchor_instruction,
                             max_new_tokens=args.anchor_max_new_tokens, temperature=args.anchor_temperature,
                             top_p=args.anchor_top_p, batch_size=args.anchor_generation_batch_size, seed=args.seed,
                             progress=PartialState().is_main_process)


def main(argv: list[str] | None = None) -> D2OTrainer:
    data_args, training_args, model_args = parse_recipe_args((DataArguments, D2OConfig, ModelConfig), "d2o", argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled), else a frozen copy.
    model_kwargs = dict(dtype=model_args.dtype or "float32", attn_implementation=model_args.attn_implementation)
    processing_class = load_processing_class(model_args.model_name_or_path)
    model = load_model(model_args.model_name_or_path, **model_kwargs).to(PartialState().device)
    peft_config = get_peft_config(model_args)
    needs_ref = peft_config is None and not (training_args.precompute_ref_log_probs
                                             and training_args.anchor_refresh_steps == 0)
    ref_model = load_model(model_args.model_name_or_path, **model_kwargs) if needs_ref else None

    # Data: negatives validated first, then anchors sampled from the untrained model (= the reference).
    max_length = training_args.max_length
    train_dataset = load_negatives(data_args, data_args.dataset_train_split, data_args.max_train_samples,
                                   processing_class, max_length)
    train_dataset = with_anchors(train_dataset, data_args.dataset_train_split, model, processing_class, training_args)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = load_negatives(data_args, data_args.dataset_test_split, data_args.max_eval_samples,
                                      processing_class, max_length)
        eval_dataset = with_anchors(eval_dataset, data_args.dataset_test_split, model, processing_class,
                                    training_args)

    trainer = D2OTrainer(
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
