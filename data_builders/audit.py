"""Audit a preference data set for noisy pairs: a short LoRA probe's per-pair loss history, scored DBPM-style.

    prefalign build audit --dataset pairs.jsonl --output audit/ --epochs 3
    prefalign build audit --dataset pairs.jsonl --output audit/ --reward-model outputs/reward --drop-flagged

Preference tuning often runs one epoch, so a loss memory built during that run holds one entry per pair: too little
to tell a flipped pair from a hard one. The audit trains a small LoRA DPO probe for a few epochs instead and records,
after each epoch, every pair's DPO loss −logsigmoid(β·margin) under the probe (or, with ``--reward-model``, one
reading of −logsigmoid(r_chosen − r_rejected) from a trained reward model). ``prefalign.mining.dbpm_statistics`` turns
the history into a weighted mean m per pair, and each pair gets:
- ``mining_score`` = (m − μ)/σ over the data set (0 when every pair has the same history),
- ``flag``: ``suspect`` when m ≥ μ + cut_faulty·σ (abnormally hard: likely flipped or wrong), ``uninformative`` when
  m ≤ μ − cut_noisy·σ (abnormally easy), ``ok`` otherwise,
- ``epoch_losses``: the recorded losses.
Written to ``<output>/audited.jsonl`` (every row, in input order), ``<output>/cleaned.jsonl`` with ``--drop-flagged``
(only the ``ok`` rows), ``<output>/summary.json`` and a histogram ``<output>/scores.png``. Every file is written
atomically; an interrupted audit resumes from the probe's last finished epoch (its checkpoints and the recorded
losses live in ``<output>/probe``), and refuses to resume with other settings. See docs/builders.md.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import TrainerCallback

from prefalign.data import load_preference_dataset, validate_preference_dataset
from prefalign.files import check_settings, write_json, write_jsonl
from prefalign.logprobs import completion_log_probs
from prefalign.losses import dpo_pair_losses
from prefalign.mining import dbpm_statistics

logger = logging.getLogger("data_builders.audit")

FLAGS = ("ok", "suspect", "uninformative")


def probe_pair_losses(trainer, dataset: Dataset, batch_size: int) -> list[float]:
    """Every pair's DPO loss under the trainer's current policy and its reference, in dataset order (no gradient).

    ``trainer``: a TRL ``DPOTrainer`` (the reference is its ``ref_model`` or the PEFT base); ``dataset``: its
    prepared (tokenised) dataset."""
    loader = DataLoader(dataset.remove_columns([c for c in dataset.column_names if c not in
                                                trainer._signature_columns]),
                        batch_size=batch_size, collate_fn=trainer.data_collator, shuffle=False)
    model, was_training = trainer.model, trainer.model.training
    model.eval()
    losses: list[float] = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="Per-pair losses", unit="batch", leave=False):
                batch = trainer._prepare_inputs(batch)
                ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
                chosen, rejected = completion_log_probs(model, batch).per_token.sum(-1).chunk(2)
                losses += dpo_pair_losses(chosen, rejected, ref_chosen, ref_rejected, trainer.beta).tolist()
    finally:
        model.train(was_training)
    return losses


class _RecordPairLosses(TrainerCallback):
    """After each epoch, record every pair's loss into ``losses.json`` (keyed by epoch, so a resumed epoch overwrites
    rather than duplicates its entry)."""

    def __init__(self, trainer, path: Path, batch_size: int):
        self.trainer, self.path, self.batch_size = trainer, path, batch_size

    def on_epoch_end(self, args, state, control, **kwargs):
        history = json.loads(self.path.read_text()) if self.path.exists() else {}
        history[str(round(state.epoch))] = probe_pair_losses(self.trainer, self.trainer.train_dataset,
                                                              self.batch_size)
        write_json(self.path, history)


def probe_loss_history(model, processing_class, dataset: Dataset, output_dir: str | Path, epochs: int = 3,
                       beta: float = 0.1, learning_rate: float = 5e-5, batch_size: int = 8, lora_r: int = 8,
                       max_length: int = 512, seed: int = 0) -> torch.Tensor:
    """Per-pair DPO losses [P, epochs] of a LoRA probe trained on ``dataset`` for ``epochs`` epochs (resumable).

    The probe's checkpoints and ``losses.json`` live in ``output_dir``; a rerun resumes from the last checkpoint."""
    from peft import LoraConfig
    from transformers.trainer_utils import get_last_checkpoint
    from trl import DPOConfig, DPOTrainer

    output_dir = Path(output_dir)
    cpu = not torch.cuda.is_available()
    config = DPOConfig(output_dir=str(output_dir), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                       learning_rate=learning_rate, beta=beta, max_length=max_length, save_strategy="epoch",
                       logging_steps=10, report_to=[], seed=seed, use_cpu=cpu,
                       bf16=not cpu and torch.cuda.is_bf16_supported(),
                       gradient_checkpointing=False, lr_scheduler_type="constant")
    peft_config = LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    trainer = DPOTrainer(model, args=config, train_dataset=dataset, processing_class=processing_class,
                         peft_config=peft_config)
    losses_file = output_dir / "losses.json"
    trainer.add_callback(_RecordPairLosses(trainer, losses_file, batch_size))
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if last:
        logger.info("resuming the probe from %s", last)
    trainer.train(resume_from_checkpoint=last)
    history = json.loads(losses_file.read_text())
    return torch.tensor([history[str(e)] for e in range(1, epochs + 1)], dtype=torch.float64).T


def reward_model_losses(reward_model, processing_class, dataset: Dataset, batch_size: int = 8,
                        max_length: int = 512) -> torch.Tensor:
    """Per-pair −logsigmoid(r_chosen − r_rejected) [P, 1] from a sequence-classification reward model, each side
    tokenised as TRL's RewardTrainer does; a side over ``max_length`` tokens is an error naming its row."""
    from prefalign.evaluation import reward_pair_scores

    reward_model.eval()
    chosen, rejected = reward_pair_scores(reward_model, processing_class, dataset, batch_size, max_length,
                                          progress=True)
    margins = torch.tensor(chosen, dtype=torch.float64) - torch.tensor(rejected, dtype=torch.float64)
    return -torch.nn.functional.logsigmoid(margins).unsqueeze(-1)


def flag_pairs(loss_history: torch.Tensor, cut_noisy: float = 2.0, cut_faulty: float = 2.0
               ) -> tuple[list[float], list[str]]:
    """(mining_score, flag) per pair from a loss history [P, t] (all planned epochs recorded)."""
    stats = dbpm_statistics(loss_history, max_epochs=loss_history.shape[1], cut_noisy=cut_noisy,
                            cut_faulty=cut_faulty)
    scores = ((stats.m - stats.mu) / stats.sigma if stats.sigma > 0 else torch.zeros_like(stats.m)).tolist()
    flags = ["suspect" if f else "uninformative" if n else "ok" for n, f in zip(stats.noisy.tolist(),
                                                                                  stats.faulty.tolist())]
    return scores, flags


def _save_histogram(path: Path, scores: Sequence[float], flags: Sequence[str], cut_noisy: float,
                    cut_faulty: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for flag, colour in zip(FLAGS, ("tab:blue", "tab:red", "tab:grey")):
        values = [s for s, f in zip(scores, flags) if f == flag]
        if values:
            ax.hist(values, bins=30, color=colour, alpha=0.7, label=f"{flag} ({len(values)})")
    for x in (-cut_noisy, cut_faulty):
        ax.axvline(x, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("mining score (m − μ)/σ")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> Dataset:
    """`prefalign build audit`: flag suspect pairs of a preference data set and write it back with the scores."""
    parser = argparse.ArgumentParser(prog="prefalign build audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="wordnet-definitions", help="preference pairs (default: wordnet-definitions)")
    parser.add_argument("--split", default="train", help="split to read (default: train)")
    parser.add_argument("--max-samples", type=int, default=None, help="only the first N pairs")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="probe base model (default: the embedded SmolLM2)")
    parser.add_argument("--reward-model", default=None, help="score with this trained reward model instead of a probe")
    parser.add_argument("--epochs", type=int, default=3, help="probe epochs = loss readings per pair (default: 3)")
    parser.add_argument("--beta", type=float, default=0.1, help="probe DPO β (default: 0.1)")
    parser.add_argument("--learning-rate", type=float, default=5e-5, help="probe learning rate (default: 5e-5)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: 8)")
    parser.add_argument("--lora-r", type=int, default=8, help="probe LoRA rank (default: 8)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per prompt + completion (default: 512)")
    parser.add_argument("--cut-noisy", type=float, default=2.0, help="'uninformative' below μ − c·σ (default: 2)")
    parser.add_argument("--cut-faulty", type=float, default=2.0, help="'suspect' above μ + c·σ (default: 2)")
    parser.add_argument("--drop-flagged", action="store_true", help="also write cleaned.jsonl with the 'ok' rows only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.epochs < 1:
        parser.error(f"--epochs must be ≥ 1, got {args.epochs}")

    from prefalign.models import load_model, load_processing_class

    output = Path(args.output)
    settings = {k: v for k, v in vars(args).items() if k not in ("output", "overwrite", "drop_flagged")}
    if args.overwrite and (output / "probe").exists():
        import shutil

        shutil.rmtree(output / "probe")
    check_settings(output / "settings.json", settings, overwrite=args.overwrite, what=str(output))
    dataset = validate_preference_dataset(load_preference_dataset(args.dataset, split=args.split,
                                                                  max_samples=args.max_samples),
                                          source=f"{args.dataset}, split {args.split!r}")
    if args.reward_model:
        from prefalign.reward_models import load_reward_model

        processing_class = load_processing_class(args.reward_model)
        history = reward_model_losses(load_reward_model(args.reward_model), processing_class, dataset,
                                      args.batch_size, args.max_length)
    else:
        history = probe_loss_history(load_model(args.model), load_processing_class(args.model), dataset,
                                     output / "probe", args.epochs, args.beta, args.learning_rate, args.batch_size,
                                     args.lora_r, args.max_length, args.seed)
    scores, flags = flag_pairs(history, args.cut_noisy, args.cut_faulty)
    audited = dataset.add_column("mining_score", scores).add_column("flag", flags).add_column(
        "epoch_losses", history.tolist())
    write_jsonl(output / "audited.jsonl", audited)
    counts = Counter(flags)
    summary = {"pairs": len(flags), **{flag: counts.get(flag, 0) for flag in FLAGS},
               "readings_per_pair": history.shape[1], "source": args.reward_model or f"probe:{args.model}"}
    if args.drop_flagged:
        cleaned = audited.filter(lambda row: row["flag"] == "ok")
        summary["cleaned_rows"] = write_jsonl(output / "cleaned.jsonl", cleaned)
    write_json(output / "summary.json", summary)
    _save_histogram(output / "scores.png", scores, flags, args.cut_noisy, args.cut_faulty)
    print(f"audited {len(flags)} pairs: {counts.get('ok', 0)} ok, {counts.get('suspect', 0)} suspect, "
          f"{counts.get('uninformative', 0)} uninformative → {output}/audited.jsonl"
          + (f", {summary['cleaned_rows']} kept in cleaned.jsonl" if args.drop_flagged else ""))
    return audited


if __name__ == "__main__":
    main()
