"""Margin-disentangled DPO (docs/methods/disentangled.md, Gradient Entanglement, arXiv:2410.13828) with the entanglement diagnostic.

    accelerate launch recipes/dpo_disentangled.py                           # embedded model + phrase pairs, pngd, LoRA
    accelerate launch recipes/dpo_disentangled.py --disentangle token_mask  # or anchored (--chosen_anchor ...)
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/dpo_disentangled.py   # 2 processes
    prefalign train dpo_disentangled ...                                    # the same script

Data: any preference rows; the default, wordnet-phrases, differs in one phrase per pair (its <MASK> tags are
stripped: high-overlap pairs, where entanglement shows). Every `entanglement_steps` steps the
GradientEntanglementCallback measures ⟨g_w,g_l⟩, norms, cosine, the two first-order conditions and the change of
log π(y_w), log π(y_l) on `entanglement_pairs` held-out pairs, logged as `entanglement/*` (0 turns it off).
Defaults: recipes/configs/dpo_disentangled.yaml. Output: a LoRA adapter (or full model) in output_dir.
"""

from dataclasses import dataclass, field

from trl import ModelConfig

from prefalign.diagnostics import GradientEntanglementCallback
from prefalign.recipe_args import (
    DataArguments,
    end_process_group,
    load_policy_and_reference,
    load_recipe_datasets,
    parse_recipe_args,
    train_and_save,
)
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer


@dataclass
class DiagnosticArguments:
    """The gradient-entanglement probe: held-out pairs (the test split) measured every N optimizer steps."""

    entanglement_steps: int = field(default=10, metadata={"help": "Measure every N steps (0: off)."})
    entanglement_pairs: int = field(default=4, metadata={"help": "Probe pairs, the first of the test split."})


def main(argv: list[str] | None = None) -> DisentangledDPOTrainer:
    data_args, diagnostic_args, training_args, model_args = parse_recipe_args(
        (DataArguments, DiagnosticArguments, DisentangledDPOConfig, ModelConfig), "dpo_disentangled", argv)

    # Model and reference: with LoRA the reference is the base model (adapter disabled), else a frozen copy.
    model, ref_model, processing_class, peft_config = load_policy_and_reference(
        model_args, need_reference=not training_args.precompute_ref_log_probs)

    # Data: validated before training. The test split is the probe (and the eval set when evaluating).
    with_eval = training_args.eval_strategy != "no"
    probe_needed = diagnostic_args.entanglement_steps > 0
    train_dataset, eval_dataset = load_recipe_datasets(data_args, processing_class, training_args.max_length,
                                                       with_eval or probe_needed)

    trainer = DisentangledDPOTrainer(
        model=model,
        ref_model=ref_model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset if with_eval else None,
        processing_class=processing_class,
        peft_config=peft_config,
    )
    if probe_needed:
        GradientEntanglementCallback(eval_dataset, every_n_steps=diagnostic_args.entanglement_steps,
                                     max_pairs=diagnostic_args.entanglement_pairs).attach(trainer)
    return train_and_save(trainer, data_args, model_args)


if __name__ == "__main__":
    main()
    end_process_group()
