"""Likelihood displacement on high-overlap pairs: TRL DPO against the three margin-disentangled modes (docs/methods/disentangled.md).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/entanglement.py                    # embedded model, ~10 min, 2 cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/entanglement.py --model tiny-causal-lm --steps 4 --eval-pairs 8
    ... --methods dpo,pngd --lr 2e-4 --steps 60 --json out.json                      # variants

Workload: the embedded `wordnet-phrases` pairs with their <MASK> tags stripped (each rejected definition differs from
the chosen one in a single phrase, so the two responses share most tokens: the regime where the chosen and rejected
gradients are entangled). Every method trains a fresh LoRA (r=16, all linear layers) on the embedded model from the
same start, on the same pairs in the same order (sequential sampler), with AdamW at the same learning rate.

Printed per method: the trajectory of the mean log π(y_w) and log π(y_l) on held-out test pairs (change since the
start, every `--eval-every` steps), the final preference accuracy on them (implicit reward margin
(Δlog π(y_w) − Δlog π(y_l)) > 0, where Δ is the change from the reference = the starting model), the mean gradient
cosine and the fraction of probe pairs whose §4 conditions hold (GradientEntanglementCallback, every
`--probe-every` steps), and seconds per training step and per probe check.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import PrinterCallback, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.diagnostics import GradientEntanglementCallback  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer, strip_phrase_tags  # noqa: E402,E501

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)

MODES = ("pngd", "token_mask", "anchored")


def _mean(values: list[float]) -> float:
    """The mean, nan for no values."""
    return statistics.fmean(values) if values else float("nan")


class Trajectory(TrainerCallback):
    """Held-out summed log-probs of chosen and rejected every `every` steps, and the time of each training step."""

    def __init__(self, trainer, eval_rows, every: int):
        prepared = trainer._prepare_dataset(eval_rows, trainer.processing_class, trainer.args, "held-out")
        self.batch = trainer.data_collator([prepared[i] for i in range(len(prepared))])
        self.trainer, self.every = trainer, every
        self.points: list[tuple[int, float, float, float]] = []  # step, Δ chosen, Δ rejected, accuracy
        self.step_seconds: list[float] = []
        self.start_logps = None

    @torch.no_grad()
    def logps(self) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.trainer.model
        model.eval()
        labels = self.batch["input_ids"].masked_fill(self.batch["completion_mask"] == 0, -100)
        out = model(input_ids=self.batch["input_ids"], attention_mask=self.batch["attention_mask"], labels=labels,
                    fused_lm_head=True, use_cache=False)
        model.train()
        return out.log_probs.sum(-1).double().chunk(2)

    def record(self, step: int) -> None:
        chosen, rejected = self.logps()
        if self.start_logps is None:
            self.start_logps = (chosen, rejected)
        d_chosen, d_rejected = chosen - self.start_logps[0], rejected - self.start_logps[1]
        accuracy = (d_chosen - d_rejected > 0).double().mean().item()
        self.points.append((step, d_chosen.mean().item(), d_rejected.mean().item(), accuracy))

    def on_train_begin(self, args, state, control, **kwargs):
        self.record(0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds.append(time.perf_counter() - self.started)
        if state.global_step % self.every == 0 or state.global_step == args.max_steps:
            self.record(state.global_step)


def run(method: str, train_rows, eval_rows, probe_rows, processing_class, opts) -> dict:
    """Train `method` for `opts.steps` steps; return its trajectory, accuracy, entanglement and timings."""
    common = dict(output_dir=f"/tmp/entanglement_{method}", report_to="none", use_cpu=not torch.cuda.is_available(),
                  bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=opts.probe_every,
                  per_device_train_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.lr,
                  lr_scheduler_type="constant", beta=opts.beta, max_length=256, seed=0,
                  train_sampling_strategy="sequential", disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = load_model(opts.model, dtype=torch.float32)
    if method == "dpo":
        trainer = DPOTrainer(model, args=DPOConfig(**common), train_dataset=strip_phrase_tags(train_rows),
                             processing_class=processing_class, peft_config=lora)
    else:
        trainer = DisentangledDPOTrainer(model, args=DisentangledDPOConfig(**common, disentangle=method),
                                         train_dataset=train_rows, processing_class=processing_class,
                                         peft_config=lora)
    trainer.remove_callback(PrinterCallback)  # the tables below say it all
    trajectory = Trajectory(trainer, strip_phrase_tags(eval_rows, "held-out"), opts.eval_every)
    trainer.add_callback(trajectory)  # before the probe, so that step times exclude it
    GradientEntanglementCallback(strip_phrase_tags(probe_rows, "probe"), every_n_steps=opts.probe_every,
                                 max_pairs=opts.probe_pairs).attach(trainer)
    trainer.train()
    checks = [e for e in trainer.state.log_history if "entanglement/cos" in e]
    return {"trajectory": trajectory.points, "accuracy": trajectory.points[-1][3],
            "step_s": statistics.median(trajectory.step_seconds[1:] or trajectory.step_seconds),
            "probe_s": statistics.median(e["entanglement/seconds"] for e in checks) if checks else float("nan"),
            "cos": [e["entanglement/cos"] for e in checks], "chosen_up": [e["entanglement/chosen_up"] for e in checks],
            "rejected_down": [e["entanglement/rejected_down"] for e in checks],
            "probe_delta_chosen": [e.get("entanglement/delta_logps_chosen") for e in checks]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="dpo,pngd,token_mask,anchored")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=2, help="pairs per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate (constant)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--eval-every", type=int, default=5, help="held-out log-probs every N steps")
    parser.add_argument("--eval-pairs", type=int, default=16, help="held-out test pairs")
    parser.add_argument("--probe-every", type=int, default=10, help="entanglement probe every N steps")
    parser.add_argument("--probe-pairs", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    opts = parser.parse_args(argv)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    processing_class = load_processing_class(opts.model)
    train = load_preference_dataset("wordnet-phrases", split="train")
    test = load_preference_dataset("wordnet-phrases", split="test")
    train_rows = train.select(range(opts.steps * opts.batch_size))
    eval_rows = test.select(range(opts.eval_pairs))
    probe_rows = test.select(range(opts.eval_pairs, opts.eval_pairs + opts.probe_pairs))
    results = {}
    for method in opts.methods.split(","):
        if method != "dpo" and method not in MODES:
            raise ValueError(f"unknown method {method!r}: dpo or one of {MODES}")
        start = time.perf_counter()
        results[method] = run(method, train_rows, eval_rows, probe_rows, processing_class, opts)
        print(f"{method}: {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\n{opts.model}, LoRA r=16, {opts.steps} steps × {opts.batch_size} pairs, AdamW lr {opts.lr}, β {opts.beta}; "
          f"held-out: {opts.eval_pairs} wordnet-phrases test pairs (tags stripped)")
    print("\nΔ mean log π on held-out pairs since the start (chosen / rejected), by step:")
    steps = [p[0] for p in next(iter(results.values()))["trajectory"]]
    print(f"{'method':<11}" + "".join(f"{s:>16}" for s in steps))
    for m, r in results.items():
        print(f"{m:<11}" + "".join(f"{c:>+8.2f}/{rj:<+7.2f}" for _, c, rj, _ in r["trajectory"]))
    print(f"\n{'method':<11}{'final acc':>10}{'Δ chosen':>10}{'Δ rejected':>11}{'probe cos':>10}{'chosen_up':>10}"
          f"{'rej_down':>9}{'s/step':>8}{'×dpo':>6}{'probe s':>8}")
    base = results.get("dpo", {}).get("step_s")
    for m, r in results.items():
        last = r["trajectory"][-1]
        print(f"{m:<11}{r['accuracy']:>10.3f}{last[1]:>+10.2f}{last[2]:>+11.2f}{_mean(r['cos']):>10.3f}"
              f"{_mean(r['chosen_up']):>10.2f}{_mean(r['rejected_down']):>9.2f}{r['step_s']:>8.2f}"
              f"{r['step_s'] / base if base else float('nan'):>6.2f}{r['probe_s']:>8.2f}")
    report = {"options": vars(opts), "results": results}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
