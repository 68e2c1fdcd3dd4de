"""Step cost of prefalign trainers against stock TRL DPO: seconds per step, peak step memory, model FLOP/s.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py                  # embedded model, 4 pairs × 256 tokens
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py --model tiny-causal-lm --steps 2   # smoke test
    ... --methods dpo,rrpo --kl-chunk-size 128 --no-rejected-kl --json out.json                  # variants
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_cost.py --workload variable               # packing (below)

Variable-length workload (`--workload variable`, issue "one preference core"): 8 pairs per step whose prompt+chosen
and prompt+rejected lengths are drawn independently from a log-normal distribution like public chat preference data:
median 250 tokens (μ = ln 250), 95th percentile 900 (σ = ln(900/250)/1.645 = 0.779), capped at 1024 (= max_length,
TRL's default); the prompt takes 10–50 % of the shorter side. Default methods alternate, in one run: stock TRL
`DPOTrainer` ("dpo", padded, its defaults otherwise) and prefalign's `PackedDPOTrainer` padded ("pdpo") and packed
("pdpo-packed") and packed with the reference cache ("pdpo-packed-cache": `reference_cache_dir`, so a step runs no
reference forward; the cache is filled when its trainer is built, before timing, in a folder under the temporary
directory that later runs of this script reuse), then each prefalign trainer padded and packed ("rrpo"/"rrpo-packed", "d2o-k2"/…, "pngd"/…,
"token_mask"/…, "anchored"/…). Targets (LoRA, CPU, embedded model): pdpo-packed ≤ 0.6× dpo's step time and ≤ 0.7×
its step memory at equal loss (the first-step losses are printed), and so does pdpo-packed-cache; every X-packed ≤
0.7× X's step. A "-packed" method is compared with its padded twin, "pdpo-packed" and "pdpo-packed-cache" with "dpo".

Model FLOP/s: useful FLOPs of a step over its time, counting only real tokens: per token a forward is 2·P (P the
matmul weights, LM head included, embeddings not) plus causal attention 2·layers·hidden·length; a step is the policy
forward, its backward (2× forward with all weights trained, 1× with LoRA: activation gradients only) and the
reference forward (none with the reference cache). Method extras (RRPO's KL head passes, pngd's per-response passes) are not counted, so their
utilisation is a lower bound. The machine's dense-matmul FLOP/s is measured first (float32 1024³ matmuls on this
process's threads); utilisation = model FLOP/s ÷ that.

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
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer  # noqa: E402
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)

CUDA = torch.cuda.is_available()
VARIABLE_METHODS = ",".join(["dpo", "pdpo", "pdpo-packed", "pdpo-packed-cache"] + [f"{m}{p}" for m in ("rrpo", "d2o-k2", "pngd", "token_mask",
                                                                             "anchored") for p in ("", "-packed")])
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


LOGNORMAL_MEDIAN, LOGNORMAL_P95, LENGTH_CAP = 250, 900, 1024


def variable_lengths(num_pairs: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts: prompt+completion log-normal (median 250, p95 900, cap 1024) per side,
    the prompt 10–50 % of the shorter side."""
    generator = torch.Generator().manual_seed(seed)
    sigma = float(torch.log(torch.tensor(LOGNORMAL_P95 / LOGNORMAL_MEDIAN))) / 1.645
    totals = (torch.randn(num_pairs, 2, generator=generator) * sigma).exp() * LOGNORMAL_MEDIAN
    totals = totals.round().clamp(16, LENGTH_CAP).long().tolist()
    shares = (0.1 + 0.4 * torch.rand(num_pairs, generator=generator)).tolist()
    return [(max(4, int(share * min(c, r))), c, r) for (c, r), share in zip(totals, shares)]


def build_variable_workload(tokenizer, batch_size: int, seed: int = 0) -> Dataset:
    """`batch_size` tagged pairs (standard text format) with `variable_lengths`: words that are one token each."""
    vocab = [t for t, i in sorted(tokenizer.get_vocab().items(), key=lambda x: x[1])
             if t.startswith("Ġ") and t[1:].isalpha() and t[1:].islower() and len(t) > 3][:2000]
    words = [tokenizer.convert_tokens_to_string([t]) for t in vocab]
    generator = torch.Generator().manual_seed(seed + 1)

    def text(n: int) -> str:
        return "".join(words[i] for i in torch.randint(len(words), (max(n, 0),), generator=generator).tolist())

    rows = []
    for prompt, chosen, rejected in variable_lengths(batch_size, seed):
        rows.append({"prompt": text(prompt), "chosen": text(chosen - prompt - 6) + " <MASK>a good answer</MASK>",
                     "rejected": text(rejected - prompt - 6) + " <MASK>a bad reply</MASK>"})
    return Dataset.from_list(rows)


def untagged(dataset: Dataset) -> Dataset:
    """The same pairs with the `<MASK>` tags removed (what a method without phrases trains on)."""
    def strip_value(value):
        if isinstance(value, str):
            return parse_phrase_tags(value)[0]
        return [{**value[0], "content": parse_phrase_tags(value[0]["content"])[0]}]
    return dataset.map(lambda row: {side: strip_value(row[side]) for side in ("chosen", "rejected")})


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
    if method.endswith("-cache"):  # reference log-probs stored once, reused by later runs (not timed)
        common["reference_cache_dir"] = os.path.join(tempfile.gettempdir(), "step_cost_reference_cache")
        method = method.removesuffix("-cache")
    packed = method.endswith("-packed")
    method = method.removesuffix("-packed")
    if packed or method == "pdpo":
        common["padding_free"] = packed
    if method == "pdpo":  # prefalign's DPO on the shared forward
        args = PackedDPOConfig(**common, loss_type=["sigmoid"])
        return PackedDPOTrainer(model, args=args, train_dataset=untagged(dataset), **kwargs)
    if packed and method == "dpo":
        raise ValueError("stock TRL's DPOTrainer has no working padding_free: use pdpo-packed")
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


def matmul_flops_per_second(size: int = 1024, repeats: int = 5) -> float:
    """The machine's dense float32 matmul FLOP/s on this process's threads (best of ``repeats``)."""
    device = "cuda" if CUDA else "cpu"
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if CUDA:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_model_flops(model, batch, full: bool, reference: bool = True) -> float:
    """Useful FLOPs of one step on the real tokens of ``batch`` (module docstring: policy forward and backward,
    reference forward unless ``reference`` is False)."""
    config = model.config.get_text_config()
    embeddings = model.get_input_embeddings().weight
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and p is not embeddings
                 and "lora_" not in n)
    head = model.get_output_embeddings().weight
    if head is embeddings:  # tied head: it is a matmul too
        matmul += head.numel()
    lengths = batch["attention_mask"].sum(-1).double()
    forward = 2 * matmul * lengths.sum() + 2 * config.num_hidden_layers * config.hidden_size * (lengths**2).sum()
    return float(forward * (1 + (2 if full else 1) + reference))


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
    loss = trainer.training_step(trainer.model, batch)
    trainer.last_loss = float(loss)
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
    parser.add_argument("--methods", default=None, help="comma-separated (default: dpo,rrpo; variable workload: "
                        "dpo,pdpo,pdpo-packed and every trainer padded and -packed); ratios are against dpo")
    parser.add_argument("--workload", choices=("fixed", "variable"), default="fixed",
                        help="fixed: B pairs × seq-len tokens; variable: log-normal lengths (module docstring)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-size", type=int, default=None, help="preference pairs per step (default: 4; 8 with "
                        "--workload variable)")
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
    if opts.workload == "variable":
        opts.batch_size = opts.batch_size or 8  # the workload: 8 pairs
        opts.seq_len = LENGTH_CAP
        opts.methods = opts.methods or VARIABLE_METHODS
        dataset = build_variable_workload(processing_class, opts.batch_size)
    else:
        opts.methods = opts.methods or "dpo,rrpo"
        opts.batch_size = opts.batch_size or 4
        dataset = build_workload(processing_class, opts.batch_size, opts.seq_len)
    if opts.child:
        method, out = opts.child.split(":", 1)
        with open(out, "w") as f:
            json.dump(cpu_step_memory(method, dataset, processing_class, opts), f)
        return {}

    methods = opts.methods.split(",")
    # CPU step memory first, each method in a child process, while this process holds no model: the children need
    # the machine's memory (a parent still holding every trainer got a child OOM-killed on a 23 GB machine)
    cpu_memory = {}
    if not CUDA and opts.memory_steps > 0:
        for m in methods:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
                subprocess.run([sys.executable, __file__, *(argv or sys.argv[1:]), "--child", f"{m}:{out.name}"],
                               env=env, check=True)
                cpu_memory[m] = json.load(open(out.name))
    trainers = {m: make_trainer(m, opts.model, dataset, processing_class, opts) for m in methods}
    batches = {m: ready(t) for m, t in trainers.items()}
    lengths = batches[methods[0]]["attention_mask"].sum(-1).tolist()
    padded = batches[methods[0]]["attention_mask"].numel()
    print(f"workload ({opts.workload}): {opts.batch_size} pairs, sequence tokens {min(lengths)}..{max(lengths)}, "
          f"median {statistics.median(lengths):.0f}, real/padded tokens {sum(lengths)}/{padded} (max_length "
          f"{opts.seq_len}), model {opts.model}, {'full' if opts.full else 'LoRA r=16'}, {'cuda' if CUDA else 'cpu'}")
    machine_flops = matmul_flops_per_second()
    print(f"machine: dense float32 matmul {machine_flops / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    flops = {m: step_model_flops(trainers[m].accelerator.unwrap_model(trainers[m].model), batches[m], opts.full,
                                 reference=not getattr(trainers[m].args, "reference_cache_dir", None))
             for m in methods}
    first_loss = {}
    seconds, cuda_peaks = {m: [] for m in methods}, {m: [] for m in methods}
    for step in range(opts.warmup + opts.steps):
        for m in methods:  # alternate so that drift and noise hit every method alike
            s, peak = timed_step(trainers[m], batches[m])
            first_loss.setdefault(m, trainers[m].last_loss)
            print(f"step {step} {m}: {s:.2f} s{' (warmup)' if step < opts.warmup else ''}", file=sys.stderr, flush=True)
            if step >= opts.warmup:
                seconds[m].append(s)
                cuda_peaks[m].append(peak)
    results = {m: {"median_s": statistics.median(seconds[m]), "mean_s": statistics.mean(seconds[m]),
                   "seconds": seconds[m], "first_loss": first_loss[m], "model_flops": flops[m],
                   "model_flops_per_s": flops[m] / statistics.median(seconds[m])} for m in methods}
    for r in results.values():
        r["utilisation"] = r["model_flops_per_s"] / machine_flops
    for m in methods:
        if CUDA:
            results[m]["step_memory_mb"] = max(cuda_peaks[m]) / MB
        else:
            results[m].update(cpu_memory.get(m, {}))

    base = results.get("dpo")
    nan = float("nan")
    print(f"\n{'method':<18}{'s/step median':>14}{'mean':>8}{'step mem MB':>12}{'peak RSS MB':>12}{'time ×dpo':>10}"
          f"{'mem ×dpo':>9}{'×padded':>8}{'mem ×pad':>9}{'GFLOP/s':>9}{'util':>7}{'loss 1':>10}")
    for m, r in results.items():
        if base:
            r["time_ratio"] = r["median_s"] / base["median_s"]
            if "step_memory_mb" in r:
                r["memory_ratio"] = r["step_memory_mb"] / base["step_memory_mb"]
        twin = results.get(m.removesuffix("-packed")) if m.endswith("-packed") else None  # -cache: vs dpo only
        if twin is not None:
            r["time_ratio_padded"] = r["median_s"] / twin["median_s"]
            if "step_memory_mb" in r:
                r["memory_ratio_padded"] = r["step_memory_mb"] / twin["step_memory_mb"]
        print(f"{m:<18}{r['median_s']:>14.3f}{r['mean_s']:>8.3f}{r.get('step_memory_mb', nan):>12.1f}"
              f"{r.get('peak_rss_mb', nan):>12.1f}{r.get('time_ratio', nan):>10.3f}{r.get('memory_ratio', nan):>9.3f}"
              f"{r.get('time_ratio_padded', nan):>8.3f}{r.get('memory_ratio_padded', nan):>9.3f}"
              f"{r['model_flops_per_s'] / 1e9:>9.2f}{r['utilisation']:>7.3f}{r['first_loss']:>10.5f}")
    targets = {"rrpo": {"time_ratio": 1.25, "memory_ratio": 1.2}} if opts.workload == "fixed" else {
        "pdpo-packed": {"time_ratio": 0.6, "memory_ratio": 0.7}, "pdpo-packed-cache": {"time_ratio": 0.6,
                                                                                     "memory_ratio": 0.7},
        "*-packed": {"time_ratio_padded": 0.7}}
    report = {"options": {k: v for k, v in vars(opts).items() if k != "child"}, "device": "cuda" if CUDA else "cpu",
              "machine_matmul_flops_per_s": machine_flops, "results": results, "targets": targets}
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
