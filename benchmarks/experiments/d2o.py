"""D²O's trade-off (arXiv:2403.03419, docs/methods/d2o.md): how far each objective pushes held-out human negatives
down, and what that costs the good answers — D²O with K = 1 and K = 4 anchors against DPO with one anchor as the
chosen answer and an unlikelihood baseline on the negatives alone, over seeds.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/experiments/d2o.py        # 3 seeds × 3 arms, SmolLM2, LoRA
    OMP_NUM_THREADS=1 python benchmarks/experiments/d2o.py --arms "D²O K=1" "D²O K=4" "DPO, one anchor" unlikelihood
    OMP_NUM_THREADS=1 python benchmarks/experiments/d2o.py --smoke            # tiny random model, seconds

Cost, measured on one CPU core of the project's 2-core machine (the other core busy): per step, unlikelihood ≈ 2 s,
DPO ≈ 5 s, D²O K=4 ≈ 20 s; one held-out evaluation (32 rows) ≈ 20 s; sampling 4 anchors of ≤ 48 tokens ≈ 3 s a
prompt. The defaults (16 steps of batch 2, 32 train prompts, evaluation every 4 steps) take about 13 min a seed.

Data: the embedded `wordnet-definitions` set. Its `rejected` answer (another word's definition) is the human
negative; the `chosen` answer (the word's true definition) is never trained on: on the held-out test rows it is the
"good answer" whose perplexity measures the damage. Training uses the first `--train-prompts` train rows.

Anchors (the positives of D²O, from the model itself): once per seed, before training, `--num-anchors` answers per
train prompt sampled from the untrained model (= the reference) with `prefalign.generation.generate`, temperature
0.8 and top-p 0.9 (the paper's), at most `--anchor-max-new-tokens` tokens, with the instruction "Answer in one short
sentence." prepended for sampling only (as `anchor_instruction` does; it makes SmolLM2's answers end sooner). An
anchor cut off at the limit is kept and trained as a complete answer (as `anchor_keep_truncated=True` does: dropping
such prompts would drop most of them); the share cut off is recorded in the setup. Training is offline: the stored
anchors are never refreshed (`anchor_refresh_steps=0`), for cost.

Arms (every one a fresh LoRA, r=16 on all linear layers, of the embedded model from the same seed-dependent
initialisation, checked; AdamW at the same constant learning rate, the same batch and steps; float32 on CPU):
- D²O K=1 and D²O K=4: `D2OTrainer` (β = α = 0.1, the documented defaults) on {prompt, rejected, the first K
  anchors}. With K = 1 and α = β the D²O loss IS DPO's with the anchor as the chosen answer (docs/methods/d2o.md),
  so "D²O K=1" and "DPO, one anchor" are the same objective through two trainers (the smoke test checks that they
  follow the same curve): D²O K=1 is not run by default (`--arms` adds it), and the claim rests on K = 4 against
  DPO.
- DPO, one anchor: `PackedDPOTrainer` (TRL's sigmoid loss, β = 0.1) on {prompt, chosen = the first anchor, rejected}.
- unlikelihood: −mean over the negative's tokens of log(1 − p(token)) (Welleck et al., arXiv:1908.04319, token-level
  unlikelihood on the negatives alone; `unlikelihood_loss`), a plain `transformers.Trainer`.

Measured on `--eval-prompts` held-out test rows at step 0 (the reference, scored once: a fresh LoRA adapter changes
nothing) and every `--eval-every` steps, through `prefalign.logprobs.completion_log_probs` on pairs tokenised as
TRL's DPOTrainer does (`prefalign.evaluation.tokenize_pair`): the negatives' drop, mean over rows of log π_θ(y_l|x) − log π_ref(y_l|x)
(summed over tokens; more negative = pushed further down), and the good answers' perplexity exp(−Σ log π / Σ
tokens) over all test `chosen` tokens, with its ratio to the reference's (1 = no damage).

Outcome rule (on the mean curves over seeds): D²O K=4 "beats" a baseline when, at D²O's final negatives drop, its
good-answer perplexity ratio is lower than the baseline's at the same drop (linear interpolation along the
baseline's curve), or, when the baseline never pushed that far, no higher than the baseline's final ratio.
"reproduced" = beats both DPO (one anchor) and unlikelihood; "partly" = one of them; "not reproduced" = neither, or
D²O K=4 did not lower the negatives at all.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import experiment_parser, new_figure, plot_curves, prepare_run, save_figure, write_result  # noqa: E402

CLAIM = "d2o"
CLAIM_TEXT = ("D²O (K = 4 self-sampled anchors) lowers held-out human negatives' log-prob with less loss of held-out "
              "good answers (lower perplexity ratio at the same drop) than DPO with one anchor as the chosen answer "
              "or unlikelihood on the negatives alone")
ARMS = ("D²O K=1", "D²O K=4", "DPO, one anchor", "unlikelihood")
DEFAULT_ARMS = ARMS[1:]
METRICS = {"neg_drop": "negatives Δ log π (nats)", "good_ppl": "good answers' perplexity",
           "good_ppl_ratio": "perplexity ratio to reference", "good_drop": "good answers Δ log π (nats)"}
ANCHOR_INSTRUCTION = "Answer in one short sentence."
MIN_COMPLEMENT = 1e-5  # 1 − p is clamped here so a token the model is sure of gives a finite loss


def unlikelihood_loss(token_logps, mask):
    """Token-level unlikelihood (arXiv:1908.04319): −mean over the masked tokens of log(1 − p), p = exp(logp);
    ``token_logps`` and ``mask`` [N, T]; 1 − p is clamped at MIN_COMPLEMENT."""
    import torch

    complement = (-torch.expm1(token_logps)).clamp(min=MIN_COMPLEMENT)
    return -(torch.log(complement) * mask).sum() / mask.sum()


def sample_anchors(model, tokenizer, prompts: list, opts, seed: int) -> tuple[list[list], float]:
    """``opts.num_anchors`` answers per prompt (assistant messages) from ``model``, and the share cut off at
    ``opts.anchor_max_new_tokens``."""
    from prefalign.generation import generate

    texts, finished = generate(model, tokenizer, prompts, num_return_sequences=opts.num_anchors,
                               max_new_tokens=opts.anchor_max_new_tokens, temperature=0.8, top_p=0.9, batch_size=8,
                               seed=seed, instruction=ANCHOR_INSTRUCTION, progress=False, return_finished=True)
    anchors = [[[{"role": "assistant", "content": text}] for text in row] for row in texts]
    cut = sum(not flag for row in finished for flag in row)
    return anchors, cut / (len(prompts) * opts.num_anchors)


def heldout_batches(tokenizer, rows, batch_size: int = 8) -> list[dict]:
    """The held-out rows as right-padded batches [chosen; rejected] (tokenised as TRL's DPOTrainer does)."""
    from prefalign.evaluation import collate_pairs, tokenize_pair

    pairs = [tokenize_pair(tokenizer, row) for row in rows]
    return [collate_pairs(pairs[i:i + batch_size], tokenizer.pad_token_id) for i in range(0, len(pairs), batch_size)]


def heldout_logps(model, batches: list[dict]):
    """Summed log-probs of the chosen (good) and rejected (negative) answers [N] each, and the chosen token counts."""
    import torch

    from prefalign.logprobs import completion_log_probs

    chosen, rejected, tokens = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            inputs = {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask", "completion_mask")}
            sums = completion_log_probs(model, inputs).per_token.double().sum(-1).cpu()
            half = sums.size(0) // 2
            chosen.append(sums[:half])
            rejected.append(sums[half:])
            tokens.append(batch["completion_mask"][:half].sum(-1).double())
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected), torch.cat(tokens)


def tradeoff_callback(batches: list[dict], reference, every: int):
    """A TrainerCallback recording, every ``every`` steps, the held-out negatives' mean log-prob drop, the good
    answers' perplexity, its ratio to the reference's, and the good answers' mean drop; step 0 is ``reference``
    (`heldout_logps` of the untrained model, which a fresh LoRA adapter leaves unchanged: computed once)."""
    from transformers import TrainerCallback

    class TradeOff(TrainerCallback):
        def __init__(self):
            self.steps, self.neg_drop, self.good_ppl, self.good_ppl_ratio, self.good_drop = [], [], [], [], []
            self.trainer, self.start = None, reference

        def record(self, step: int, logps=None) -> None:
            chosen, rejected, tokens = logps or heldout_logps(self.trainer.model, batches)
            ppl = float((-chosen.sum() / tokens.sum()).exp())
            self.steps.append(step)
            self.neg_drop.append(float((rejected - self.start[1]).mean()))
            self.good_drop.append(float((chosen - self.start[0]).mean()))
            self.good_ppl.append(ppl)
            self.good_ppl_ratio.append(ppl / self.good_ppl[0])
            print(f"  step {step}: negatives Δ log π {self.neg_drop[-1]:+.2f}, good answers' perplexity {ppl:.2f} "
                  f"(× {self.good_ppl_ratio[-1]:.3f})", flush=True)

        def on_train_begin(self, args, state, control, **kwargs):
            self.record(0, reference)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0 or state.global_step == args.max_steps:
                self.record(state.global_step)

    return TradeOff()


def unlikelihood_trainer_class():
    """A `transformers.Trainer` whose loss is `unlikelihood_loss` on the negatives' tokens (rows: prompt_ids and
    rejected_ids, batched by D²O's collator with no anchors, i.e. the B negatives alone)."""
    from transformers import Trainer

    from prefalign.logprobs import completion_log_probs

    class UnlikelihoodTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            token_logps = completion_log_probs(model, inputs).per_token
            return unlikelihood_loss(token_logps, inputs["completion_mask"][:, 1:].to(token_logps.dtype))

    return UnlikelihoodTrainer


def lora_fingerprint(model) -> float:
    """Σ |w| over the LoRA A matrices (B starts at zero): equal for two adapters initialised alike."""
    return sum(float(p.detach().double().abs().sum()) for n, p in model.named_parameters() if "lora_A" in n)


def train(arm: str, rows: list[dict], opts, seed: int, output_dir: Path, callback) -> float:
    """Train one arm for ``opts.steps`` steps with ``callback`` recording; returns its LoRA init's fingerprint."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainingArguments, set_seed
    from trl.trainer.utils import add_fused_lm_head

    from prefalign.evaluation import tokenize_pair
    from prefalign.models import load_model, load_processing_class
    from prefalign.trainers.d2o import D2OConfig, D2OTrainer, DataCollatorForAnchors
    from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer

    common = dict(output_dir=str(output_dir), max_steps=opts.steps, per_device_train_batch_size=opts.batch_size,
                  learning_rate=opts.learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                  logging_steps=max(opts.steps, 1), save_strategy="no", report_to="none", bf16=False,
                  use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, seed=seed, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    set_seed(seed)  # the LoRA adapter (random init) is added before the Trainer seeds itself
    model, tokenizer = load_model(opts.model, dtype=torch.float32), load_processing_class(opts.model)
    if arm.startswith("D²O"):
        k = int(arm.split("K=")[1])
        data = Dataset.from_list([{"prompt": r["prompt"], "rejected": r["rejected"], "anchors": r["anchors"][:k]}
                                  for r in rows])
        args = D2OConfig(num_anchors=k, beta=opts.beta, alpha=opts.alpha, anchor_refresh_steps=0, max_length=256,
                         **common)
        trainer = D2OTrainer(model, args=args, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    elif arm.startswith("DPO"):
        data = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["anchors"][0], "rejected": r["rejected"]}
                                  for r in rows])
        trainer = PackedDPOTrainer(model, args=PackedDPOConfig(beta=opts.beta, max_length=256, **common),
                                   train_dataset=data, processing_class=tokenizer, peft_config=lora)
    else:
        add_fused_lm_head(model)  # completion_log_probs reads TRL's fused head, as in the preference trainers
        model = get_peft_model(model, lora)
        ids = [tokenize_pair(tokenizer, r) for r in rows]
        data = Dataset.from_list([{"prompt_ids": p["prompt_ids"], "rejected_ids": p["rejected_ids"], "anchor_ids": []}
                                  for p in ids])
        collator = DataCollatorForAnchors(tokenizer.pad_token_id, max_length=256)
        trainer = unlikelihood_trainer_class()(model, args=TrainingArguments(remove_unused_columns=False, **common),
                                               train_dataset=data, data_collator=collator)
    trainer.remove_callback(PrinterCallback)
    callback.trainer = trainer
    trainer.add_callback(callback)
    fingerprint = lora_fingerprint(trainer.model)
    trainer.train()
    return fingerprint


def ratio_at(drop: float, drops: list[float], ratios: list[float]) -> float | None:
    """A trade-off curve's perplexity ratio at negatives drop ``drop``: linear interpolation on the first segment
    (in step order) whose two ends enclose ``drop``; None when the curve never reaches it."""
    points = list(zip(drops, ratios))
    for (d0, r0), (d1, r1) in zip(points, points[1:]):
        if min(d0, d1) <= drop <= max(d0, d1):
            return r0 if d0 == d1 else r0 + (r1 - r0) * (drop - d0) / (d1 - d0)
    return None


def beats(curve: dict, baseline: dict) -> tuple[bool, float | None]:
    """Whether the mean ``curve`` (lists "neg_drop", "good_ppl_ratio") ends with a lower perplexity ratio than
    ``baseline`` at the same drop, or pushes further than the baseline ever did at no higher ratio than its end
    (the module docstring's rule); also the baseline's ratio at the curve's final drop (None if never reached)."""
    drop, ratio = curve["neg_drop"][-1], curve["good_ppl_ratio"][-1]
    at = ratio_at(drop, baseline["neg_drop"], baseline["good_ppl_ratio"])
    if at is not None:
        return ratio < at, at
    return drop < min(baseline["neg_drop"]) and ratio <= baseline["good_ppl_ratio"][-1], None


def mean_curve(curve: dict) -> dict[str, list[float]]:
    """The mean over seeds, step by step, of each per-seed curve of ``curve``."""
    return {key: [statistics.fmean(v) for v in zip(*runs)] for key, runs in curve.items() if key != "steps"}


def main(argv: list[str] | None = None) -> dict:
    parser = experiment_parser(__doc__, default_seeds=[0, 1, 2])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS,
                        help="default: all but D²O K=1, which is DPO, one anchor's objective (module docstring)")
    parser.add_argument("--train-prompts", type=int, default=32, help="default: 32 (steps × batch: one epoch)")
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps of every arm (default: 16)")
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW, constant, every arm")
    parser.add_argument("--beta", type=float, default=0.1, help="β of D²O and DPO (default: 0.1)")
    parser.add_argument("--alpha", type=float, default=0.1, help="D²O's α (default: 0.1)")
    parser.add_argument("--num-anchors", type=int, default=4, help="anchors sampled per prompt (K of the K=4 arm)")
    parser.add_argument("--anchor-max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=4)
    opts = parser.parse_args(argv)
    if opts.smoke:
        opts.model, opts.train_prompts, opts.eval_prompts, opts.steps, opts.batch_size = "tiny-causal-lm", 4, 4, 2, 2
        opts.eval_every, opts.anchor_max_new_tokens = 1, 8
    if min(opts.steps, opts.eval_every, opts.batch_size) < 1:
        parser.error("--steps, --eval-every and --batch-size must be ≥ 1")
    if opts.num_anchors != 4:
        parser.error("--num-anchors: the arms are D²O K=1 and K=4, so 4 anchors are sampled per prompt")
    if not set(DEFAULT_ARMS) <= set(opts.arms):
        parser.error(f"--arms: the outcome compares {DEFAULT_ARMS[0]} with the other two; include {DEFAULT_ARMS}")
    arms = [arm for arm in ARMS if arm in opts.arms]
    results_dir, work = prepare_run(opts, CLAIM)
    started = time.time()

    import torch
    from trl.trainer.utils import add_fused_lm_head

    from prefalign.data import load_preference_dataset
    from prefalign.models import load_model, load_processing_class

    train_rows = list(load_preference_dataset("wordnet-definitions", split="train").select(range(opts.train_prompts)))
    test_rows = load_preference_dataset("wordnet-definitions", split="test").select(range(opts.eval_prompts))
    tokenizer = load_processing_class(opts.model)
    batches = heldout_batches(tokenizer, test_rows)
    base = load_model(opts.model, dtype=torch.float32)  # the reference: samples the anchors, scores step 0
    add_fused_lm_head(base)  # for completion_log_probs; generation is unchanged by it
    base_logps = heldout_logps(base, batches)
    per_seed = {arm: {name: [] for name in METRICS} for arm in arms}
    curves = {arm: {"steps": [], **{name: [] for name in METRICS}} for arm in arms}
    cut_shares = []
    for seed in opts.seeds:
        tick = time.time()
        anchors, cut = sample_anchors(base, tokenizer, [r["prompt"] for r in train_rows], opts, seed)
        cut_shares.append(cut)
        print(f"seed {seed}: sampled {opts.num_anchors} anchors for {len(train_rows)} prompts in "
              f"{time.time() - tick:.0f} s; {cut:.0%} cut off at {opts.anchor_max_new_tokens} tokens", flush=True)
        rows = [{**r, "anchors": a} for r, a in zip(train_rows, anchors)]
        fingerprints = {}
        for arm in arms:
            print(f"seed {seed}: {arm}", flush=True)
            tick = time.time()
            curve = tradeoff_callback(batches, base_logps, opts.eval_every)
            fingerprints[arm] = train(arm, rows, opts, seed, work / f"{arm.split(',')[0]}-{seed}", curve)
            print(f"seed {seed}: {arm} done in {time.time() - tick:.0f} s", flush=True)
            for name in METRICS:
                per_seed[arm][name].append(getattr(curve, name)[-1])
                curves[arm][name].append(getattr(curve, name))
            curves[arm]["steps"] = curve.steps
        if max(fingerprints.values()) - min(fingerprints.values()) > 1e-6 * max(fingerprints.values()):
            raise RuntimeError(f"seed {seed}: the arms' LoRA initialisations differ: {fingerprints}")

    means = {arm: mean_curve(curves[arm]) for arm in arms}
    d2o = means["D²O K=4"]
    won = {baseline: beats(d2o, means[baseline]) for baseline in ("DPO, one anchor", "unlikelihood")}
    wins = [baseline for baseline, (beat, _) in won.items() if beat]
    verdict = ("not reproduced (D²O K=4 did not lower the negatives)" if d2o["neg_drop"][-1] >= 0 else
               "reproduced" if len(wins) == 2 else "partly reproduced" if wins else "not reproduced")
    finals = ", ".join(f"{arm} {means[arm]['neg_drop'][-1]:+.2f} nats at × {means[arm]['good_ppl_ratio'][-1]:.3f}"
                       for arm in arms)
    matched = "; ".join(f"{baseline} at that drop: " + ("never reached" if at is None else f"× {at:.3f}")
                        for baseline, (_, at) in won.items())
    outcome = (f"{verdict}: final negatives Δ log π and good-answer perplexity ratio (means over seeds): {finals}; "
               f"{matched}")
    setup = {"model": f"{opts.model}, LoRA r=16 on all linear layers, float32", "data": f"wordnet-definitions: "
             f"{opts.train_prompts} train prompts with their rejected answer as the human negative; "
             f"{opts.eval_prompts} held-out test rows (negatives = rejected, good answers = chosen)",
             "steps": opts.steps, "learning_rate": opts.learning_rate, "seeds": opts.seeds,
             "batch_size": opts.batch_size, "beta": opts.beta, "alpha": opts.alpha,
             "optimizer": "AdamW, constant learning rate",
             "anchors": f"{opts.num_anchors} per prompt sampled once per seed from the reference (temperature 0.8, "
                        f"top-p 0.9, ≤ {opts.anchor_max_new_tokens} new tokens, instruction "
                        f"\"{ANCHOR_INSTRUCTION}\" for sampling only), offline (never refreshed); cut-off anchors "
                        f"kept: {statistics.fmean(cut_shares):.0%} of them on average",
             "eval_every": opts.eval_every}
    result = write_result(results_dir, CLAIM, title="D²O trade-off: negatives down, good answers kept",
                          claim_text=CLAIM_TEXT, command="make experiments CLAIM=d2o", smoke=opts.smoke, setup=setup,
                          metrics=METRICS, per_seed=per_seed, outcome=outcome, started=started, curves=curves)
    plot(result, results_dir)
    return result


def plot(result: dict, results_dir: Path) -> Path:
    """The trade-off (good answers' perplexity ratio against the negatives' drop, step by step: the mean over seeds
    as a line, each seed's points faint), and each of the two over steps (mean, min–max band)."""
    fig, axes = new_figure(3)
    for arm, curve in result["curves"].items():
        mean = mean_curve(curve)
        line, = axes[0].plot(mean["neg_drop"], mean["good_ppl_ratio"], marker="o", markersize=3, label=arm)
        for drops, ratios in zip(curve["neg_drop"], curve["good_ppl_ratio"]):
            axes[0].scatter(drops, ratios, s=6, color=line.get_color(), alpha=0.3)
    axes[0].set(xlabel="held-out negatives Δ log π (nats)", ylabel="good answers' perplexity ratio")
    axes[0].axhline(1, color="grey", linewidth=0.8)
    axes[0].legend(fontsize=7)
    plot_curves(axes[1], result["curves"], "neg_drop", "held-out negatives Δ log π")
    plot_curves(axes[2], result["curves"], "good_ppl_ratio", "good answers' perplexity ratio")
    return save_figure(fig, results_dir, CLAIM)


if __name__ == "__main__":
    main()
