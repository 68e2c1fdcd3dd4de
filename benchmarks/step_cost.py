"""Step cost of prefalign trainers against stock TRL DPO on one fixed workload: seconds per step and peak memory.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py                  # embedded model, 4 pairs × 256 tokens
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py --model tiny-causal-lm --steps 2   # smoke test
    ... --methods dpo,rrpo --kl-chunk-size 128 --no-rejected-kl --json out.json                  # variants

Targets (RRPO issue): on the embedded model (smollm2-135m-instruct, LoRA r=16) at 256 tokens, RRPO's training step
takes ≤ 1.25× DPO's time and ≤ 1.2× DPO's peak step memory. Ratios are printed against dpo.

Workload: B pairs from the embedded `wordnet-phrases` set, each completion lengthened (identically on both sides) with
untagged definitions of other rows until prompt+chosen is about `--seq-len` tokens; `max_length=seq_len`. RRPO gets
the `<MASK>` tags, DPO the same text without them. Each trainer builds its batch with its own collator from the rows.

Time: forward + backward + optimizer step (`trainer.training_step` then `optimizer.step()`), trainers alternating
dpo/rrpo/dpo/... in one process so that machine noise hits all alike; median and mean over `--steps` after `--warmup`.

Memory: on CUDA, `max_memory_allocated()` over each step minus the memory allocated just before it. On CPU the
allocator keeps no peak counter, and the RSS of a process holding two models and both trainers' history says little,
so each method runs in its own child process (this script with a hidden flag) that samples its RSS with psutil every
2 ms during `--memory-steps` steps (after the warmup). "Step memory" = peak RSS during the steps − RSS just before
them: the weights, optimizer state and libraries are in the baseline, so the increment isolates the activations,
logits and temporaries a step allocates, which is what the methods differ in. The child sets MALLOC_MMAP_THRESHOLD_
so that glibc returns freed tensors to the OS (otherwise freed warmup memory stays in RSS and hides later peaks).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.phrases import parse_phrase_tags  # noqa: E402
from prefalign.trainers.d2o import D2OConfig, D2OTrainer  # noqa: E402
from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer  # noqa: E402
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)

CUDA = torch.cuda.is_available()
MB = 2**20


def build_workload(tokenizer, batch_size: int, seq_len: int) -> Dataset:
    """B tagged wordnet-phrases pairs whose prompt+chosen is lengthened to about `seq_len` tokens."""
    rows = load_preference_dataset("wordnet-phrases", split="train")
    filler = [parse_phrase_tags(r["chosen"][-1]["content"])[0] for r in rows.select(range(batch_size, len(rows)))]
    out, next_filler = [], 0
    for row in rows.select(range(batch_size)):
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        while True:
            text = tokenizer.apply_chat_template(row["prompt"] + [{"role": "assistant", "content": parse_phrase_tags(
                f"{chosen} {filler[next_filler]}")[0]}], tokenize=False)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > seq_len:
                break
            chosen, rejected = f"{chosen} {filler[next_filler]}", f"{rejected} {filler[next_filler]}"
            next_filler += 1
        out.append({"prompt": row["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}]})
    return Dataset.from_list(out)


def untagged(dataset: Dataset) -> Dataset:
    """The same pairs with the `<MASK>` tags removed (what a method without phrases trains on)."""
    def strip(row):
        return {side: [{**row[side][0], "content": parse_phrase_tags(row[side][0]["content"])[0]}]
                for side in ("chosen", "rejected")}
    return dataset.map(strip)


def with_anchors(dataset: Dataset, k: int) -> Dataset:
    """D²O rows: the chosen completion repeated as K anchors (DPO's chosen length, so costs compare fairly)."""
    return dataset.map(lambda row: {"anchors": [row["chosen"]] * k}, remove_columns=["chosen"])


def make_trainer(method: str, model_name: str, dataset: Dataset, processing_class, opts: argparse.Namespace):
    """A trainer for `method` on `model_name` (LoRA r=16, or all weights plus a reference copy with `opts.full`)."""
    common = dict(output_dir=os.path.join(tempfile.gettempdir(), f"step_cost_{method}"), report_to="none",
                  per_device_train_batch_size=opts.batch_size, max_length=opts.seq_len, learning_rate=5e-6,
                  beta=0.1, use_cpu=not CUDA, bf16=CUDA, gradient_checkpointing=opts.gradient_checkpointing,
                  save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)
    model = load_model(model_name, dtype=torch.float32)
    ref_model = load_model(model_name, dtype=torch.float32) if opts.full else None
    peft_config = None if opts.full else LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs = dict(ref_model=ref_model, processing_class=processing_class, peft_config=peft_config)
    if method == "dpo":
        args = DPOConfig(**common, loss_type=["sigmoid"])
        return DPOTrainer(model, args=args, train_dataset=untagged(dataset), **kwargs)
    elif method == "rrpo":
        extra = {} if opts.kl_chunk_size is None else {"kl_chunk_size": opts.kl_chunk_size}
        args = RRPOConfig(**common, log_rejected_kl=not opts.no_rejected_kl, **extra)
        return RRPOTrainer(model, args=args, train_dataset=dataset, **kwargs)
    elif method in ("pngd", "token_mask", "anchored"):  # margin-disentangled DPO (targets 2.2×, 1.1×, 1.1×)
        args = DisentangledDPOConfig(**common, disentangle=method)
        return DisentangledDPOTrainer(model, args=args, train_dataset=untagged(dataset), **kwargs)
    elif method.startswith("d2o-k"):  # --methods dpo,d2o-k1,d2o-k4,d2o-k8
        k = int(method.removeprefix("d2o-k"))
        args = D2OConfig(**common, num_anchors=k, anchor_refresh_steps=0)
        return D2OTrainer(model, args=args, train_dataset=with_anchors(untagged(dataset), k), **kwargs)
    raise ValueError(f"unknown method {method!r}: add a branch to make_trainer")


def ready(trainer):
    """Optimizer created, and the one batch built by the trainer's own dataloader (all B rows)."""
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set inside Trainer.train
    return next(iter(trainer.get_train_dataloader()))


def timed_step(trainer, batch) -> tuple[float, float]:
    """One forward + backward + optimizer step: (seconds, CUDA peak bytes over the pre-step allocation or nan)."""
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    if CUDA:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (torch.cuda.max_memory_allocated() - before if CUDA else float("nan"))


def cpu_step_memory(method: str, dataset: Dataset, processing_class, opts) -> dict:
    """Child process: RSS sampled every 2 ms during `opts.memory_steps` steps after the warmup (MB)."""
    trainer = make_trainer(method, opts.model, dataset, processing_class, opts)
    batch = ready(trainer)
    for _ in range(opts.warmup):
        timed_step(trainer, batch)
    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.002)

    baseline = process.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(opts.memory_steps):
        timed_step(trainer, batch)
    done.set()
    sampler.join()
    return {"step_memory_mb": (peak[0] - baseline) / MB, "peak_rss_mb": peak[0] / MB, "baseline_rss_mb": baseline / MB}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", default="dpo,rrpo", help="comma-separated; ratios are against dpo")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=256, help="prompt+completion tokens; also max_length")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    parser.add_argument("--memory-steps", type=int, default=1, help="CPU: steps sampled per child (0: skip memory)")
    parser.add_argument("--full", action="store_true", help="train all weights (reference: a second copy)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--kl-chunk-size", type=int, default=None, help="RRPOConfig.kl_chunk_size (default: its own)")
    parser.add_argument("--no-rejected-kl", action="store_true", help="RRPOConfig.log_rejected_kl=False")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # METHOD:OUT.json, the CPU memory child
    opts = parser.parse_args(argv)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    processing_class = load_processing_class(opts.model)
    dataset = build_workload(processing_class, opts.batch_size, opts.seq_len)
    if opts.child:
        method, out = opts.child.split(":", 1)
        with open(out, "w") as f:
            json.dump(cpu_step_memory(method, dataset, processing_class, opts), f)
        return {}

    methods = opts.methods.split(",")
    trainers = {m: make_trainer(m, opts.model, dataset, processing_class, opts) for m in methods}
    batches = {m: ready(t) for m, t in trainers.items()}
    lengths = batches[methods[0]]["attention_mask"].sum(-1).tolist()
    print(f"workload: {opts.batch_size} pairs, sequence tokens {min(lengths)}..{max(lengths)} (max_length "
          f"{opts.seq_len}), model {opts.model}, {'full' if opts.full else 'LoRA r=16'}, {'cuda' if CUDA else 'cpu'}")
    seconds, cuda_peaks = {m: [] for m in methods}, {m: [] for m in methods}
    for step in range(opts.warmup + opts.steps):
        for m in methods:  # alternate so that drift and noise hit every method alike
            s, peak = timed_step(trainers[m], batches[m])
            print(f"step {step} {m}: {s:.2f} s{' (warmup)' if step < opts.warmup else ''}", file=sys.stderr, flush=True)
            if step >= opts.warmup:
                seconds[m].append(s)
                cuda_peaks[m].append(peak)
    results = {m: {"median_s": statistics.median(seconds[m]), "mean_s": statistics.mean(seconds[m]),
                   "seconds": seconds[m]} for m in methods}
    del trainers, batches
    for m in methods:
        if CUDA:
            results[m]["step_memory_mb"] = max(cuda_peaks[m]) / MB
        elif opts.memory_steps > 0:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child", f"{m}:{out.name}"],
                               env=env, check=True)
                results[m].update(json.load(open(out.name)))

    base = results.get("dpo")
    print(f"\n{'method':<12}{'s/step median':>15}{'mean':>9}{'step mem MB':>13}{'peak RSS MB':>13}"
          f"{'time ×dpo':>11}{'mem ×dpo':>10}")
    for m, r in results.items():
        if base:
            r["time_ratio"] = r["median_s"] / base["median_s"]
            if "step_memory_mb" in r:
                r["memory_ratio"] = r["step_memory_mb"] / base["step_memory_mb"]
        print(f"{m:<12}{r['median_s']:>15.3f}{r['mean_s']:>9.3f}{r.get('step_memory_mb', float('nan')):>13.1f}"
              f"{r.get('peak_rss_mb', float('nan')):>13.1f}{r.get('time_ratio', float('nan')):>11.3f}"
              f"{r.get('memory_ratio', float('nan')):>10.3f}")
    report = {"options": {k: v for k, v in vars(opts).items() if k != "child"}, "device": "cuda" if CUDA else "cpu",
              "results": results, "targets": {"rrpo": {"time_ratio": 1.25, "memory_ratio": 1.2}}}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
