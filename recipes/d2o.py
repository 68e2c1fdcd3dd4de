"""D²O: alignment from human negatives only, against self-generated anchors (arXiv:2403.03419, docs/methods/d2o.md).

    accelerate launch recipes/d2o.py                                      # embedded model + WordNet negatives, LoRA
    accelerate launch recipes/d2o.py --num_anchors 8 --alpha 0.2          # override any field
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/d2o.py   # 2 processes
    prefalign train d2o ...                                               # the same script

Data: rows with a `prompt` and a human negative `rejected`. The default is the embedded wordnet-definitions set,
where the rejected answer is another word's definition (its `chosen` column is not used). Unless the rows already
carry `anchors`, K anchors per prompt are sampled once from the untrained (reference) model into
<output_dir>/anchors/<split>.jsonl: every process samples its share of each shard on its own device and the main
process writes; later runs with the same settings reuse that file, and an interrupted build resumes. Prompts with an
anchor cut off at `anchor_max_new_tokens` are dropped and counted (`--anchor_keep_truncated true` keeps them).
Under DeepSpeed ZeRO-3 build the anchors first (`prefalign build anchors`) and pass the file as --dataset_name: the
model is partitioned at load time and cannot sample here (refused at start otherwise).
After `anchor_warmup_steps` the trainer samples new anchors from the policy every `anchor_refresh_steps` steps.
Defaults: recipes/configs/d2o.yaml. Output: a LoRA adapter (or full model) in output_dir.
"""

from pathlib import Path

from accelerate import PartialState
from datasets import Dataset
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import ModelConfig

from data_builders.negatives import build_anchors
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
)
from prefalign.trainers.d2o import D2OConfig, D2OTrainer


def with_anchors(dataset: Dataset, split: str, model, processing_class, args: D2OConfig) -> Dataset:
    """The rows with K anchors each: as given, or sampled from ``model`` once and cached under output_dir."""
    if "anchors" in dataset.column_names:
        return dataset
    if is_deepspeed_zero3_enabled():
        raise ValueError("d2o: under DeepSpeed ZeRO-3 the model is partitioned at load time and cannot sample the "
                         "anchors; build them first (`prefalign build anchors --output anchors.jsonl ...`) and pass "
                         "the file as --dataset_name")
    path = Path(args.output_dir) / "anchors" / f"{split}.jsonl"
    # Every process samples its share of each shard; the main process writes the shards and the file.
    return build_anchors(dataset, path, model=model, processing_class=processing_class, num_anchors=args.num_anchors,
                         instruction=args.anchor_instruction, max_new_tokens=args.anchor_max_new_tokens,
                         temperature=args.anchor_temperature, top_p=args.anchor_top_p,
                         batch_size=args.anchor_generation_batch_size, seed=args.seed,
                         keep_truncated=args.anchor_keep_truncated, distributed=True)


def main(argv: list[str] | None = None) -> D2OTrainer:
    data_args, training_args, model_args = parse_recipe_args((DataArguments, D2OConfig, ModelConfig), "d2o", argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled), else a frozen copy (not
    # needed when reference log-probs are precomputed and anchors never refreshed).
    model, ref_model, processing_class, peft_config = load_policy_and_reference(
        model_args, need_reference=not (training_args.precompute_ref_log_probs
                                        and training_args.anchor_refresh_steps == 0))
    model = model.to(PartialState().device)

    # Data: negatives validated first, then anchors sampled from the untrained model (= the reference).
    with_eval = training_args.eval_strategy != "no"
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length,
                                                       with_eval, required=("prompt", "rejected"))
    train_dataset = with_anchors(train_dataset, data_args.dataset_train_split, model, processing_class, training_args)
    if eval_dataset is not None:
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
    return train_and_save(trainer, data_args, model_args)


if __name__ == "__main__":
    main()
    end_process_group()
