"""Evaluation of a trained model against its base on held-out preference pairs (``prefalign eval``).

For a causal LM (the output of dpo, rrpo, d2o, delta_dpo, dpo_disentangled, pairwise_rm, pairwise_ppo), with the
base model as the reference and β the implicit-reward scale (docs/methods/dpo.md):

- ``reward_accuracy``: share of pairs whose implicit reward margin
  β·[(log π − log π_base)(y+) − (log π − log π_base)(y−)] is > 0 (a tie, e.g. the base against itself, counts as
  wrong), and ``reward_margin``, its mean;
- ``logp_accuracy``: share of pairs where the model itself gives the chosen response the higher summed log-prob
  (meaningful for the base too, so it compares before and after training);
- ``phrase_accuracy`` / ``phrase_logp_accuracy``, when the data tags phrases with ``<MASK>…</MASK>``
  (docs/methods/rrpo.md): the same two comparisons per aligned phrase k (present on both sides), over all phrases;
- ``kl_chosen``: Σ over the chosen response's tokens of KL(π_base ‖ π) over the full vocabulary, mean over pairs.

Log-probs go through the shared preference core (``prefalign.logprobs.completion_log_probs``, TRL's
fused LM head) and the KL through ``prefalign.logprobs.frozen_head_token_kl``, on sequences tokenised as TRL's
DPOTrainer tokenises them. For a reward model (reward_wintie: sequence classification) ``evaluate_reward_model``
gives the pairwise accuracy and the AUC. ``judge_win_rate`` adds the TrustJudge (docs/methods/trustjudge.md) win-rate
of the model's greedy answers against the base's.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.data import check_reward_pair_lengths, has_vision_columns, reward_pair_ids
from prefalign.logprobs import check_unscaled_logits, completion_log_probs, frozen_head_token_kl
from prefalign.losses import mann_whitney_auc
from prefalign.messages import completion_text, with_completion_text
from prefalign.models import adapter_base
from prefalign.phrases import OPEN_TAG, completion_start, pair_phrase_spans, phrase_token_ids
from prefalign.reward_models import is_reward_model, load_reward_model, load_reward_model_and_processor

logger = logging.getLogger(__name__)


# ---- data -----------------------------------------------------------------------------------------------------


def tokenize_pair(processing_class: Any, row: dict) -> dict[str, list[int]]:
    """Prompt, chosen and rejected token ids of one pair as TRL's DPOTrainer tokenises them, plus a phrase id per
    completion token (k ≥ 1 inside phrase k of a ``<MASK>``-tagged pair, else 0; all 0 for untagged pairs)."""
    from prefalign.generation import prompt_token_ids

    chosen, rejected = row["chosen"], row["rejected"]
    chosen_spans, rejected_spans = [], []
    chosen_text, rejected_text = completion_text(chosen), completion_text(rejected)
    if OPEN_TAG in chosen_text or OPEN_TAG in rejected_text:
        clean_chosen, chosen_spans, clean_rejected, rejected_spans = pair_phrase_spans(chosen_text, rejected_text)
        chosen, rejected = with_completion_text(chosen, clean_chosen), with_completion_text(rejected, clean_rejected)
    out = {"prompt_ids": prompt_token_ids(processing_class, [row["prompt"]])[0]}
    sides = {"chosen": (chosen, chosen_spans), "rejected": (rejected, rejected_spans)}
    starts = {side: completion_start(processing_class, row["prompt"], text) for side, (text, _) in sides.items()}
    cut = min(starts.values())  # as TRL: the prompt ends where it and either completion first diverge
    for side, (text, spans) in sides.items():
        ids, phrases = phrase_token_ids(processing_class, row["prompt"], text, spans)
        out[f"{side}_ids"] = out["prompt_ids"][cut:starts[side]] + ids
        out[f"{side}_phrase_ids"] = [0] * (starts[side] - cut) + phrases
    out["prompt_ids"] = out["prompt_ids"][:cut]
    return out


def collate_pairs(pairs: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch [2B, L] of B tokenised pairs: chosen rows first, then rejected (TRL's layout):
    ``input_ids``, ``attention_mask``, ``completion_mask`` and ``phrase_ids`` (aligned with ``input_ids``)."""
    rows = [(p["prompt_ids"], p[f"{side}_ids"], p[f"{side}_phrase_ids"])
            for side in ("chosen", "rejected") for p in pairs]
    length = max(len(prompt) + len(completion) for prompt, completion, _ in rows)
    batch = {key: torch.zeros(len(rows), length, dtype=torch.long)
             for key in ("input_ids", "attention_mask", "completion_mask", "phrase_ids")}
    batch["input_ids"].fill_(pad_token_id)
    for i, (prompt, completion, phrases) in enumerate(rows):
        n, m = len(prompt), len(completion)
        batch["input_ids"][i, :n + m] = torch.tensor(prompt + completion)
        batch["attention_mask"][i, :n + m] = 1
        batch["completion_mask"][i, n:n + m] = 1
        batch["phrase_ids"][i, n:n + m] = torch.tensor(phrases, dtype=torch.long)
    return batch


# ---- log-probs and KL -----------------------------------------------------------------------------------------


def _with_fused_head(model):
    """``model`` with TRL's fused LM head added once (generation is unchanged by it)."""
    from trl.trainer.utils import add_fused_lm_head

    if not getattr(model, "_prefalign_fused_head", False):
        add_fused_lm_head(model)
        model._prefalign_fused_head = True
    return model


def _forward(model, batch: dict[str, torch.Tensor]):
    """Per-token completion log-probs [N, L−1] and last hidden states [N, L, H] of ``model`` on ``batch``."""
    inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "completion_mask")}
    result = completion_log_probs(_with_fused_head(model), inputs, backbone=model.base_model)
    return result.per_token.double().cpu(), result.hidden


@torch.no_grad()
def pair_statistics(model, base, batch: dict[str, torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """Per-pair values [B] of one collated batch: summed log-probs of chosen/rejected under ``model`` and ``base``,
    the implicit reward margin, KL(π_base ‖ π) summed over the chosen tokens, and per phrase k [B, K] the phrase
    log-prob sums of both models on both sides (K = 0 when the batch has no phrase)."""
    logps, hidden = _forward(model, batch)
    base_logps, base_hidden = (logps, hidden) if base is model else _forward(base, batch)
    mask = batch["completion_mask"][:, 1:].bool()
    head, base_head = model.get_output_embeddings(), base.get_output_embeddings()
    half = batch["input_ids"].size(0) // 2
    kl = frozen_head_token_kl(hidden[:half, :-1], base_hidden[:half, :-1].to(hidden.device), head.weight.detach(),
                              base_head.weight.detach().to(hidden.device), mask[:half].to(hidden.device),
                              None if head.bias is None else head.bias.detach(),
                              None if base_head.bias is None else base_head.bias.detach().to(hidden.device))
    phrase_ids = batch["phrase_ids"][:, 1:]
    num_phrases = int(phrase_ids.max())

    def phrase_sums(values: torch.Tensor) -> torch.Tensor:
        sums = values.new_zeros(values.size(0), num_phrases + 1).scatter_add(1, phrase_ids, values)
        return sums[:, 1:]

    present = torch.stack([(phrase_ids == k).any(-1) for k in range(1, num_phrases + 1)], -1) \
        if num_phrases else torch.zeros(phrase_ids.size(0), 0, dtype=torch.bool)
    sums, base_sums = logps.sum(-1), base_logps.sum(-1)
    rewards = beta * (sums - base_sums)
    phrase_logps, phrase_base = phrase_sums(logps), phrase_sums(base_logps)
    return {
        "chosen_logps": sums[:half], "rejected_logps": sums[half:],
        "base_chosen_logps": base_sums[:half], "base_rejected_logps": base_sums[half:],
        "reward_margin": rewards[:half] - rewards[half:],
        "kl_chosen": kl.double().cpu(),
        "phrase_chosen_logps": phrase_logps[:half], "phrase_rejected_logps": phrase_logps[half:],
        "phrase_chosen_rewards": beta * (phrase_logps - phrase_base)[:half],
        "phrase_rejected_rewards": beta * (phrase_logps - phrase_base)[half:],
        "phrase_both": present[:half] & present[half:],
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def evaluate_preferences(model, base, processing_class, dataset, beta: float = 0.1, batch_size: int = 8,
                         progress: bool = True, desc: str = "Evaluating") -> dict[str, Any]:
    """Preference accuracy, mean reward margin, phrase accuracies and KL of ``model`` against ``base`` (the
    reference) on the ``prompt``/``chosen``/``rejected`` rows of ``dataset`` (module docstring); both models are
    loaded causal LMs sharing ``processing_class``. Returns a JSON-ready dict."""
    if beta <= 0 or batch_size < 1:
        raise ValueError(f"evaluate_preferences: beta ({beta}) must be > 0 and batch_size ({batch_size}) ≥ 1")
    if has_vision_columns(dataset):
        raise NotImplementedError("evaluate_preferences scores text pairs; this dataset has image or video columns")
    for checked in (model, base):  # the KL applies the LM head to hidden states directly
        check_unscaled_logits(checked.config, "prefalign eval's KL")
    model.eval()
    base.eval()
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pairs, problems = [], []
    for i in range(len(dataset)):
        try:
            pairs.append(tokenize_pair(processing_class, dataset[i]))
        except ValueError as error:  # phrase tags that cannot be aligned, completions not found in their tokens
            problems.append(f"  row {i}, columns 'chosen'/'rejected': {error}")
    if problems:
        raise ValueError(f"{len(problems)} of {len(dataset)} pairs cannot be evaluated:\n" + "\n".join(problems[:10]))
    totals: dict[str, list[float]] = {k: [] for k in ("reward_margin", "kl_chosen", "reward_correct", "logp_correct")}
    phrase_reward, phrase_logp, tagged = [], [], 0
    for start in tqdm(range(0, len(pairs), batch_size), desc=desc, disable=not progress):
        chunk = pairs[start:start + batch_size]
        stats = pair_statistics(model, base, collate_pairs(chunk, pad), beta)
        totals["reward_margin"] += stats["reward_margin"].tolist()
        totals["kl_chosen"] += stats["kl_chosen"].tolist()
        totals["reward_correct"] += (stats["reward_margin"] > 0).float().tolist()
        totals["logp_correct"] += (stats["chosen_logps"] > stats["rejected_logps"]).float().tolist()
        both = stats["phrase_both"]
        phrase_reward += (stats["phrase_chosen_rewards"] > stats["phrase_rejected_rewards"])[both].float().tolist()
        phrase_logp += (stats["phrase_chosen_logps"] > stats["phrase_rejected_logps"])[both].float().tolist()
        tagged += sum(any(p["chosen_phrase_ids"]) or any(p["rejected_phrase_ids"]) for p in chunk)
    return {
        "pairs": len(pairs), "beta": beta,
        "reward_accuracy": _mean(totals["reward_correct"]),
        "reward_margin": _mean(totals["reward_margin"]),
        "reward_ties": sum(m == 0 for m in totals["reward_margin"]),
        "logp_accuracy": _mean(totals["logp_correct"]),
        "kl_chosen": _mean(totals["kl_chosen"]),
        "phrase_pairs": tagged, "phrases": len(phrase_reward),
        "phrase_accuracy": _mean(phrase_reward),
        "phrase_logp_accuracy": _mean(phrase_logp),
    }


# ---- reward models --------------------------------------------------------------------------------------------


@torch.no_grad()
def reward_scores(model, processing_class, ids: list[list[int]], batch_size: int = 8,
                  progress: bool = False) -> list[float]:
    """The reward model's scalar output for each token-id sequence (right-padded batch by batch)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = []
    for start in tqdm(range(0, len(ids), batch_size), desc="Reward scores", unit="batch", leave=False,
                      disable=not progress):
        chunk = ids[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.tensor([seq + [pad_id] * (width - len(seq)) for seq in chunk], device=model.device)
        attention_mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in chunk],
                                      device=model.device)
        scores += model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].double().tolist()
    return scores


def reward_pair_scores(model, processing_class, dataset, batch_size: int = 8, max_length: int | None = None,
                       progress: bool = False) -> tuple[list[float], list[float]]:
    """(chosen, rejected) reward-model scores of each pair, each side tokenised exactly as TRL's RewardTrainer
    tokenises it in training (``prefalign.data.reward_pair_ids``). Sides longer than ``max_length`` are an error
    naming their rows (``check_reward_pair_lengths``), never silently truncated."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    check_reward_pair_lengths(dataset, tokenizer, max_length)
    pairs = reward_pair_ids(dataset, tokenizer)
    return (reward_scores(model, processing_class, [c for c, _ in pairs], batch_size, progress),
            reward_scores(model, processing_class, [r for _, r in pairs], batch_size, progress))


def evaluate_reward_model(model, processing_class, dataset, batch_size: int = 8, progress: bool = True
                          ) -> dict[str, Any]:
    """Pairwise accuracy (share of pairs scored chosen > rejected; ties in the data, ``is_tie``, left out and
    counted) and AUC (all chosen scores against all rejected scores, ties ½) of a reward model."""
    model.eval()
    chosen, rejected = reward_pair_scores(model, processing_class, dataset, batch_size, progress=progress)
    ties = list(dataset["is_tie"]) if "is_tie" in dataset.column_names else [False] * len(dataset)
    wins = [(c, r) for c, r, t in zip(chosen, rejected, ties) if not t]
    good = torch.tensor([c for (c, _) in wins], dtype=torch.float64)
    bad = torch.tensor([r for (_, r) in wins], dtype=torch.float64)
    return {"pairs": len(dataset), "tie_pairs": sum(map(bool, ties)),
            "pairwise_accuracy": _mean([float(c > r) for c, r in wins]),
            "auc": mann_whitney_auc(good, bad) if wins else None,
            "reward_margin": _mean([c - r for c, r in wins])}


# ---- answers and the judge ------------------------------------------------------------------------------------


def greedy_answers(model, processing_class, prompts: list, max_new_tokens: int = 64) -> list[str]:
    """One greedy answer per prompt (``prefalign.generation.generate``)."""
    from prefalign.generation import generate

    return [a[0] for a in generate(model, processing_class, prompts, max_new_tokens=max_new_tokens, do_sample=False,
                                   progress=False)]


def judge_win_rate(judge, prompts: list, answers: list[str], base_answers: list[str]) -> dict[str, Any]:
    """TrustJudge verdicts (``TrustJudge.compare``, both orders) of each answer against the base's: win-rate with
    ties counted ½, and the counts."""
    verdicts = [judge.compare(p, a, b).verdict for p, a, b in zip(prompts, answers, base_answers)]
    wins, ties = verdicts.count("first"), verdicts.count("tie")
    return {"prompts": len(prompts), "wins": wins, "ties": ties, "losses": verdicts.count("second"),
            "win_rate": (wins + 0.5 * ties) / len(prompts) if prompts else None}


# ---- the training report ---------------------------------------------------------------------------------------

CURVES = (("loss", "loss"), ("margin", "rewards/margins"), ("KL", "kl/chosen"))


def plot_training_curves(log_history: list[dict], path: str | Path) -> list[str]:
    """A small PNG of the logged training loss, reward margin and KL (chosen) against the step, one panel each for
    those present in ``log_history`` (the trainer's ``state.log_history``); returns the keys plotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [(label, key) for label, key in CURVES if any(key in e and "step" in e for e in log_history)]
    if not present:
        return []
    fig, axes = plt.subplots(1, len(present), figsize=(3.2 * len(present), 2.6), dpi=80, squeeze=False)
    for ax, (label, key) in zip(axes[0], present):
        points = [(e["step"], e[key]) for e in log_history if key in e and "step" in e and "train_loss" not in e]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(f"{label} ({key})", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [key for _, key in present]


def _cell(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _report_markdown(report: dict) -> str:
    """report.md: metrics before/after, answers side by side, and the curves."""
    lines = [f"# Training report: {report['output_dir']}", "",
             f"Base model `{report['base']}`, held-out data `{report['dataset']}` (split `{report['split']}`, "
             f"{report['after'].get('pairs')} pairs).", "", "| metric | before (base) | after (trained) |",
             "|---|---|---|"]
    for key, label in report["metrics"]:
        lines.append(f"| {label} | {_cell(report['before'].get(key))} | {_cell(report['after'].get(key))} |")
    for item in report.get("answers", []):
        lines += ["", f"**Prompt**: {item['prompt']}", "", "| base | trained |", "|---|---|",
                  "| {} | {} |".format(*(a.replace("|", "\\|").replace("\n", " ") for a in (item["base"], item["trained"])))]
    if report.get("curves"):
        lines += ["", f"![training curves]({report['curves']})"]
    return "\n".join(lines) + "\n"


PREFERENCE_METRICS = [("logp_accuracy", "preference accuracy (log π(chosen) > log π(rejected))"),
                      ("reward_accuracy", "implicit-reward accuracy (margin > 0 against the base)"),
                      ("reward_margin", "mean implicit reward margin"),
                      ("phrase_logp_accuracy", "phrase accuracy (log π, per `<MASK>` phrase)"),
                      ("phrase_accuracy", "phrase implicit-reward accuracy"),
                      ("kl_chosen", "KL(base ‖ model) summed over chosen tokens")]
REWARD_METRICS = [("pairwise_accuracy", "pairwise accuracy"), ("auc", "AUC"), ("reward_margin", "mean reward margin")]


def training_report(output_dir: str | Path, base_name: str, dataset_name: str, split: str = "test",
                    max_samples: int | None = None, log_history: list[dict] | None = None, beta: float = 0.1,
                    num_prompts: int = 2, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Before/after report of a recipe's output in ``output_dir`` against its base on held-out pairs: metrics of
    ``evaluate_preferences`` (or ``evaluate_reward_model``), ``num_prompts`` held-out prompts answered greedily by
    both, and the training curves; saved as report.json, report.md and training_curves.png in ``output_dir``."""
    from prefalign.data import load_preference_dataset
    from prefalign.models import load_model, load_model_or_adapter, load_processing_class

    output_dir = Path(output_dir)
    dataset = load_preference_dataset(dataset_name, split=split, max_samples=max_samples)
    report: dict[str, Any] = {"output_dir": str(output_dir), "base": base_name, "dataset": dataset_name, "split": split}
    if is_reward_model(str(output_dir)):
        model, processing_class = load_reward_model_and_processor(str(output_dir))
        model = _on_device(model)
        base = _on_device(load_reward_model(base_name))
        report["metrics"] = REWARD_METRICS
        report["before"] = evaluate_reward_model(base, processing_class, dataset, batch_size, progress=False)
        report["after"] = evaluate_reward_model(model, processing_class, dataset, batch_size, progress=False)
    else:
        model, processing_class = load_model_or_adapter(str(output_dir))
        model, base = _on_device(model), _on_device(load_model(base_name))
        base_processing = load_processing_class(base_name)
        report["metrics"] = PREFERENCE_METRICS
        report["before"] = evaluate_preferences(base, base, base_processing, dataset, beta, batch_size,
                                                desc="Report: base")
        report["after"] = evaluate_preferences(model, base, processing_class, dataset, beta, batch_size,
                                               desc="Report: trained")
        prompts = dataset["prompt"][:num_prompts]
        base_answers = greedy_answers(base, base_processing, prompts, max_new_tokens)
        answers = greedy_answers(model, processing_class, prompts, max_new_tokens)
        from prefalign.messages import conversation_text

        report["answers"] = [{"prompt": conversation_text(p), "base": b, "trained": a}
                             for p, b, a in zip(prompts, base_answers, answers)]
    report["curves"] = None
    if log_history and plot_training_curves(log_history, output_dir / "training_curves.png"):
        report["curves"] = "training_curves.png"
    write_report(report, output_dir / "report.json")
    markdown = _report_markdown(report)
    (output_dir / "report.md").write_text(markdown)
    return report | {"markdown": markdown}


# ---- loading and the command ----------------------------------------------------------------------------------


def _on_device(model):
    """``model`` on this process's device (``prefalign.generation.process_device``: a GPU when there is one)."""
    from prefalign.generation import process_device

    return model.to(process_device())


def write_report(report: dict, path: str | Path) -> None:
    """Write ``report`` as indented JSON (atomically, through ``prefalign.files``)."""
    from prefalign.files import write_json

    write_json(path, report)


def main(argv: list[str] | None = None) -> dict:
    """``prefalign eval``: parse arguments, load the models and data, evaluate, print and save the JSON report."""
    parser = argparse.ArgumentParser(prog="prefalign eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="trained model: folder, LoRA adapter folder, hub id or short name")
    parser.add_argument("--dataset", required=True, help="preference data: embedded short name, file, folder or hub id")
    parser.add_argument("--base", default=None, help="reference model (default: the adapter's base model)")
    parser.add_argument("--split", default="test", help="split to evaluate (default: test)")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate only the first N rows")
    parser.add_argument("--beta", type=float, default=0.1, help="implicit reward scale β (default 0.1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--judge", action="store_true", help="add a TrustJudge win-rate against the base's answers")
    parser.add_argument("--judge-model", default=None, help="judge model (default: the embedded SmolLM2)")
    parser.add_argument("--judge-prompts", type=int, default=16, help="prompts answered and judged (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length for --judge (default 64)")
    parser.add_argument("--output", default=None, help="JSON report path (default: <model folder>/eval_<dataset>.json "
                                                      "for a folder, else ./eval_report.json)")
    args = parser.parse_args(argv)

    from prefalign.data import load_preference_dataset, validate_preference_dataset
    from prefalign.models import DEFAULT_CAUSAL_LM, load_model, load_model_or_adapter

    dataset = load_preference_dataset(args.dataset, split=args.split, max_samples=args.max_samples)
    report: dict[str, Any] = {"model": args.model, "dataset": args.dataset, "split": args.split}
    if is_reward_model(args.model):
        if args.judge:
            parser.error("--judge compares generated answers; a reward model does not generate")
        model, processing_class = load_reward_model_and_processor(args.model)
        model = _on_device(model)
        dataset = validate_preference_dataset(dataset, None, source=f"{args.dataset}, split {args.split!r}")
        report["kind"] = "reward model"
        report.update(evaluate_reward_model(model, processing_class, dataset, args.batch_size))
    else:
        base_name = args.base or adapter_base(args.model)
        if base_name is None:
            parser.error(f"{args.model} is a full model: name its base with --base (the reference for the rewards "
                         "and the KL)")
        model, processing_class = load_model_or_adapter(args.model)
        model, base = _on_device(model), _on_device(load_model(base_name))
        dataset = validate_preference_dataset(dataset, processing_class, source=f"{args.dataset}, split {args.split!r}")
        report.update(kind="causal LM", base=base_name)
        report.update(evaluate_preferences(model, base, processing_class, dataset, args.beta, args.batch_size))
        if args.judge:
            from prefalign.judges.judge import TrustJudge

            judge_name = args.judge_model or DEFAULT_CAUSAL_LM
            judge_model, judge_processing = load_model_or_adapter(judge_name)
            judge_model = _on_device(judge_model)
            prompts = dataset["prompt"][: args.judge_prompts]
            answers = greedy_answers(model, processing_class, prompts, args.max_new_tokens)
            base_answers = greedy_answers(base, processing_class, prompts, args.max_new_tokens)
            report["judge"] = {"model": judge_name, **judge_win_rate(TrustJudge(judge_model, judge_processing),
                                                                      prompts, answers, base_answers)}
    output = args.output or (Path(args.model) / f"eval_{Path(args.dataset).stem}.json" if Path(args.model).is_dir()
                             else "eval_report.json")
    write_report(report, output)
    print(json.dumps(report, indent=2))
    print(f"Saved the evaluation report to {output}")
    return report
