"""D²O against DPO-with-an-anchor-as-chosen and the untrained model, on held-out WordNet prompts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/d2o_heldout.py                    # embedded model, a few CPU minutes
    ... --train-prompts 64 --steps 32 -K 8 --json out.json                          # bigger
    ... --model tiny-causal-lm --steps 2 --eval-rows 8                              # smoke test

Setting (docs/methods/d2o.md): only human negatives are known. Train prompts come from wordnet-definitions/train, with
rejected = another word's definition (the human negative); their true definitions are never used for training.
K anchors per prompt are sampled once from the untrained model (temperature 0.8, top-p 0.9; cached in --workdir).
  - untrained: the embedded model as it is.
  - D²O:       D2OTrainer on (prompt, negative, K anchors), offline (no online refresh: same data for both methods).
  - DPO:       TRL's DPOTrainer on (prompt, chosen = the first anchor, rejected = the negative).
Both train a LoRA adapter (r=16, all linear layers) from the same base with the same steps, prompts per step and
learning rate; the reference is the base model. Measured on held-out wordnet-definitions/test rows (words never
trained on): the summed log-prob of the human negative (lower = better avoided), and the log-prob and per-token
perplexity of the TRUE definition (helpfulness kept: it should not collapse with the negatives).
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from data_builders.negatives import build_anchors  # noqa: E402
from prefalign.data import load_preference_dataset  # noqa: E402
from prefalign.models import load_model, load_processing_class  # noqa: E402
from prefalign.trainers.d2o import D2OConfig, D2OTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import register_tiny_models  # noqa: E402

register_tiny_models()  # smoke runs name the test suite's tiny random models (tiny-causal-lm)


def completion_logps(model, tokenizer, rows: Dataset, column: str, batch_size: int = 8) -> tuple[list[float], int]:
    """Summed log-prob of each row's `column` answer after its chat-templated prompt, and the total token count."""
    sums, tokens = [], 0
    model.eval()
    for start in range(0, len(rows), batch_size):
        batch = rows.select(range(start, min(start + batch_size, len(rows))))
        prompts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in batch]
        fulls = [tokenizer.apply_chat_template(r["prompt"] + r[column], tokenize=False) for r in batch]
        prompt_lens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
        encoded = tokenizer(fulls, add_special_tokens=False, padding=True, padding_side="right", return_tensors="pt")
        with torch.no_grad():
            logits = model(**encoded).logits[:, :-1].float()
        logps = logits.log_softmax(-1).gather(-1, encoded["input_ids"][:, 1:, None])[..., 0]
        positions = torch.arange(logps.shape[1])[None]
        mask = (positions >= torch.tensor(prompt_lens)[:, None] - 1) & encoded["attention_mask"][:, 1:].bool()
        sums += (logps * mask).sum(-1).tolist()
        tokens += int(mask.sum())
    return sums, tokens


def evaluate(model, tokenizer, held_out: Dataset) -> dict:
    negative, _ = completion_logps(model, tokenizer, held_out, "rejected")
    true, true_tokens = completion_logps(model, tokenizer, held_out, "chosen")
    return {"logp_negative": sum(negative) / len(negative), "logp_true": sum(true) / len(true),
            "ppl_true": math.exp(-sum(true) / true_tokens),
            "true_above_negative": sum(t > n for t, n in zip(true, negative)) / len(true)}


def train(method: str, opts, anchors: Dataset, tokenizer) -> tuple:
    """A LoRA adapter trained with `method` ('d2o' or 'dpo') on the anchor rows; returns (model, seconds)."""
    common = dict(output_dir=os.path.join(tempfile.gettempdir(), f"d2o_heldout_{method}"), report_to="none",
                  bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no", logging_steps=1,
                  per_device_train_batch_size=opts.batch_size, max_steps=opts.steps, learning_rate=opts.lr,
                  lr_scheduler_type="constant", max_length=256, beta=opts.beta, seed=0, disable_tqdm=True)
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
    model = load_model(opts.model)
    if method == "d2o":
        args = D2OConfig(**common, alpha=opts.alpha, num_anchors=opts.num_anchors, anchor_refresh_steps=0)
        trainer = D2OTrainer(model, args=args, train_dataset=anchors, processing_class=tokenizer,
                             peft_config=peft_config)
    else:
        pairs = anchors.map(lambda r: {"chosen": r["anchors"][0]}, remove_columns=["anchors"])
        trainer = DPOTrainer(model, args=DPOConfig(**common), train_dataset=pairs, processing_class=tokenizer,
                             peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    last = [e for e in trainer.state.log_history if "loss" in e][-1]
    print(f"{method}: trained {opts.steps} steps in {seconds:.0f} s, last loss {last['loss']:.4f}")
    return trainer.model, seconds


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--train-prompts", type=int, default=16)
    parser.add_argument("--eval-rows", type=int, default=48, help="held-out test rows")
    parser.add_argument("-K", "--num-anchors", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest anchor")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "d2o_heldout"),
                        help="anchors are cached here")
    parser.add_argument("--json", help="write the results here")
    opts = parser.parse_args(argv)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    tokenizer = load_processing_class(opts.model)
    train_rows = load_preference_dataset("wordnet-definitions", split="train").select(range(opts.train_prompts))
    held_out = load_preference_dataset("wordnet-definitions", split="test").select(range(opts.eval_rows))
    base = load_model(opts.model)
    start = time.perf_counter()
    name = f"{opts.model}-n{opts.train_prompts}-k{opts.num_anchors}-t{opts.max_new_tokens}.jsonl"
    anchors = build_anchors(train_rows, Path(opts.workdir) / name, model=base, processing_class=tokenizer,
                            num_anchors=opts.num_anchors, max_new_tokens=opts.max_new_tokens, seed=0)
    print(f"anchors: {opts.train_prompts} prompts × K={opts.num_anchors} in {time.perf_counter() - start:.0f} s "
          f"(cached in {opts.workdir}); e.g. {anchors[0]['anchors'][0][0]['content']!r:.100}")
    results = {"untrained": {**evaluate(base, tokenizer, held_out), "train_s": 0.0}}
    del base
    for method in ("d2o", "dpo"):
        model, seconds = train(method, opts, anchors, tokenizer)
        results[method] = {**evaluate(model, tokenizer, held_out), "train_s": seconds}

    print(f"\n{opts.eval_rows} held-out prompts; {opts.train_prompts} train prompts, K={opts.num_anchors}, "
          f"{opts.steps} steps × {opts.batch_size} prompts, lr {opts.lr}, β={opts.beta}, α={opts.alpha}, {opts.model}")
    base_neg = results["untrained"]["logp_negative"]
    print(f"{'method':<12}{'logp(neg)':>11}{'Δ vs base':>11}{'logp(true)':>12}{'ppl(true)':>11}"
          f"{'true>neg':>10}{'train s':>9}")
    for method, r in results.items():
        print(f"{method:<12}{r['logp_negative']:>11.2f}{r['logp_negative'] - base_neg:>11.2f}{r['logp_true']:>12.2f}"
              f"{r['ppl_true']:>11.2f}{r['true_above_negative']:>10.2f}{r['train_s']:>9.0f}")
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
