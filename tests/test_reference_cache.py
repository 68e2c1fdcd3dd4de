"""The reference cache (`reference_cache_dir`, prefalign/trainers/reference_cache.py; docs/methods/dpo.md): computed
once, reused without a reference forward, equal to the live reference; recomputed when any key component changes or
the folder is damaged; refused where the loss needs the live reference; written once under 2 processes."""

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch
from datasets import load_from_disk
from packing_driver import pairs
from peft import LoraConfig
from reference_cache_driver import config, models, run

from prefalign.models import load_model, load_processing_class
from prefalign.trainers.d2o import D2OConfig, D2OTrainer
from prefalign.trainers.disentangled import DisentangledDPOConfig
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("ref-*") if p.is_dir())


def _build(tmp_path, cache, data=None, tokenizer=None, ref=None, **extra) -> tuple[PackedDPOTrainer, int]:
    """A DPO trainer over ``cache`` (precompute happens in __init__) and its number of reference forwards."""
    policy, default_ref = models()
    ref = default_ref if ref is None else ref
    calls = []
    handle = ref.register_forward_pre_hook(lambda *_: calls.append(1))
    args = config(str(tmp_path / "out"), 4, reference_cache_dir=str(cache), **extra)
    trainer = PackedDPOTrainer(policy, ref, args=args, train_dataset=pairs().select(range(8)) if data is None else data,
                               processing_class=tokenizer or load_processing_class("tiny-causal-lm"))
    handle.remove()
    return trainer, len(calls)


def test_second_run_reuses_cache_and_losses_equal_live_reference(tmp_path, caplog):
    """Run 1 computes the entry, run 2 reads it without one reference forward; both log the losses of a run with
    the live reference (no precompute) within 1e-6."""
    cache = tmp_path / "cache"
    caplog.set_level(logging.WARNING, logger="prefalign.trainers.reference_cache")
    live, _, _ = run(str(tmp_path / "live"), 4)
    first, first_calls, _ = run(str(tmp_path / "first"), 4, reference_cache_dir=str(cache))
    assert "reference cache: computing" in caplog.text and first_calls == 8  # 16 pairs / precompute batches of 2
    caplog.clear()
    second, second_calls, trainer = run(str(tmp_path / "second"), 4, reference_cache_dir=str(cache))
    assert second_calls == 0
    assert f"reference cache: reusing {_entries(cache)[0]} (16 rows)" in caplog.text
    assert len(_entries(cache)) == 1 and trainer.args.precompute_ref_log_probs
    assert len(live) == 3
    assert first == pytest.approx(live, abs=1e-6) and second == pytest.approx(live, abs=1e-6)
    assert second == first


def _anchor_rows():
    """D²O rows: a prompt, its negative and K = 2 anchors, of unequal lengths."""
    return pairs().map(lambda row: {"anchors": [row["chosen"], "Maybe an answer."]}, remove_columns=["chosen"])


@pytest.mark.parametrize("trainer_class", [RRPOTrainer, D2OTrainer], ids=["rrpo-per-token", "d2o-anchors"])
def test_other_stored_forms_are_cached(tmp_path, trainer_class):
    """RRPO with alpha=0 stores per-token reference log-probs, D²O its K anchors' sums [B, K]: the cached and the
    reused columns equal a plain precompute's, and the reuse runs no reference forward."""
    tokenizer = load_processing_class("tiny-causal-lm")
    common = dict(report_to="none", use_cpu=True, bf16=False, precompute_ref_log_probs=True,
                  precompute_ref_batch_size=4, max_length=256, per_device_train_batch_size=4)
    if trainer_class is RRPOTrainer:
        make_args, data = (lambda **kw: RRPOConfig(alpha=0.0, **common, **kw)), pairs()
    else:
        make_args, data = (lambda **kw: D2OConfig(num_anchors=2, anchor_refresh_steps=0, **common, **kw)), _anchor_rows()
    stored, calls = {}, {}
    for name, extra in (("plain", {}), ("cached", {"reference_cache_dir": str(tmp_path / "cache")}),
                        ("reused", {"reference_cache_dir": str(tmp_path / "cache")})):
        policy, ref = models()
        calls[name] = []
        ref.register_forward_pre_hook(lambda *_, name=name: calls[name].append(1))
        # a run-specific column keeps TRL's own per-session cache (keyed by data and model only) out of "plain"
        trainer = trainer_class(policy, ref, args=make_args(output_dir=str(tmp_path / name), **extra),
                                train_dataset=data.add_column("run", [name == "plain"] * len(data)),
                                processing_class=tokenizer)
        stored[name] = {c: trainer.train_dataset[c] for c in COLUMNS}
    assert len(calls["cached"]) == 4 and not calls["reused"]
    widths = {len(v) for v in stored["cached"]["ref_chosen_logps"]}
    if trainer_class is D2OTrainer:
        assert widths == {2}  # the K anchors' sums
    else:
        assert len(widths) == 1 and widths.pop() > 1  # per token, zero-padded to the dataset's width
    for column in COLUMNS:
        for name in ("cached", "reused"):
            assert torch.tensor(stored[name][column]) == pytest.approx(torch.tensor(stored["plain"][column]),
                                                                         abs=1e-6)


@pytest.mark.parametrize("component", ["max_length", "truncation_mode", "data", "tokenizer", "reference_weights"])
def test_changed_key_component_recomputes(tmp_path, caplog, component):
    """Each key component, changed, gives a new entry computed with the reference (and the log names it)."""
    cache = tmp_path / "cache"
    data = pairs().select(range(4))
    _, calls = _build(tmp_path, cache, data=data)
    assert calls > 0 and len(_entries(cache)) == 1
    _, calls = _build(tmp_path, cache, data=data)
    assert calls == 0  # the unchanged key is reused
    caplog.set_level(logging.WARNING, logger="prefalign.trainers.reference_cache")
    changed = {"max_length": dict(max_length=32), "truncation_mode": dict(truncation_mode="keep_end"),
               "data": dict(data=data.map(lambda row, i: {"rejected": row["rejected"] + " No." * (i == 3)},
                                          with_indices=True))}.get(component, {})
    if component == "tokenizer":
        tokenizer = load_processing_class("tiny-causal-lm")
        tokenizer.add_tokens(["<unused-token>"])
        changed = dict(tokenizer=tokenizer)
    if component == "reference_weights":
        ref = load_model("tiny-causal-lm").double()
        with torch.no_grad():
            next(ref.parameters()).view(-1)[0] += 1e-3
        changed = dict(ref=ref)
    _, calls = _build(tmp_path, cache, **{"data": data, **changed})
    assert calls > 0 and len(_entries(cache)) == 2
    key = {"tokenizer": "tokenizer_hash"}.get(component, component)
    assert "reference cache: computing" in caplog.text and f"{key}: " in caplog.text


def test_lora_reference_is_the_base_without_the_adapter(tmp_path):
    """Under LoRA the key hashes the base weights, not the trained adapter: a second run with another adapter
    initialisation reuses the entry, whose values equal the base model's given as a separate ref_model."""
    cache = tmp_path / "cache"
    stored = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        policy, _ = models()
        calls = []
        policy.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        trainer = PackedDPOTrainer(policy, None, args=config(str(tmp_path / "out"), 4, reference_cache_dir=str(cache)),
                                   train_dataset=pairs().select(range(4)),
                                   processing_class=load_processing_class("tiny-causal-lm"),
                                   peft_config=LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                          target_modules="all-linear"))
        stored.append(trainer.train_dataset["ref_chosen_logps"])
        assert (len(calls) > 0) == (seed == 0) and len(_entries(cache)) == 1
    base, _ = models()  # the policy's base weights, as a separate reference: its own entry
    trainer, _ = _build(tmp_path, tmp_path / "other", data=pairs().select(range(4)), ref=base)
    assert stored[1] == stored[0]
    assert stored[0] == pytest.approx(trainer.train_dataset["ref_chosen_logps"], abs=1e-6)


@pytest.mark.parametrize("damage", ["values", "done", "rows"])
def test_damaged_entry_is_recomputed(tmp_path, caplog, damage):
    """A changed stored value, a missing done.json or a wrong row count is reported and computed again; the
    recomputed values equal the first ones."""
    cache = tmp_path / "cache"
    trainer, _ = _build(tmp_path, cache)
    first = {c: trainer.train_dataset[c] for c in COLUMNS}
    (entry,) = _entries(cache)
    if damage == "values":
        arrow = next((entry / "logps").glob("*.arrow"))
        raw = bytearray(arrow.read_bytes())
        position = raw.rfind(bytes(torch.tensor([first["ref_chosen_logps"][0]], dtype=torch.float32).numpy()))
        assert position > 0  # stored as float32, like TRL's precomputed columns
        raw[position:position + 4] = bytes(torch.tensor([0.5], dtype=torch.float32).numpy())
        arrow.write_bytes(bytes(raw))
    elif damage == "done":
        (entry / "done.json").unlink()
    else:
        done = json.loads((entry / "done.json").read_text())
        (entry / "done.json").write_text(json.dumps({**done, "num_rows": 7}))
    caplog.set_level(logging.WARNING, logger="prefalign.trainers.reference_cache")
    trainer, calls = _build(tmp_path, cache)
    assert calls > 0 and "cannot be reused" in caplog.text
    assert {c: trainer.train_dataset[c] for c in COLUMNS} == first
    _, calls = _build(tmp_path, cache)
    assert calls == 0  # the rewritten entry is whole again


@pytest.mark.parametrize("make", [
    lambda d: RRPOConfig(output_dir=d, report_to="none", alpha=0.01, reference_cache_dir="c"),
    lambda d: DisentangledDPOConfig(output_dir=d, report_to="none", disentangle="token_mask", reference_cache_dir="c"),
    lambda d: PackedDPOConfig(output_dir=d, report_to="none", sync_ref_model=True, reference_cache_dir="c"),
], ids=["rrpo-alpha", "token_mask", "sync_ref_model"])
def test_live_reference_losses_refuse_the_cache(tmp_path, make):
    """Losses that need the reference every step refuse reference_cache_dir at start, saying they keep it live."""
    with pytest.raises(ValueError, match="keeps the live reference"):
        make(str(tmp_path))


def test_cache_dir_implies_precompute(tmp_path):
    assert D2OConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False,
                     reference_cache_dir="c").precompute_ref_log_probs
    assert not D2OConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False).precompute_ref_log_probs


@pytest.mark.multiproc
@pytest.mark.parametrize("backend,lora", [("ddp.yaml", False), ("zero3.yaml", True)], ids=["ddp", "zero3-lora"])
def test_two_processes_write_once_and_reuse(tmp_path, backend, lora):
    """2 processes (DDP with a ref_model; ZeRO-3 with LoRA, the reference being the partitioned base): the first
    run writes one entry with every row, under the 1-process key and equal to the 1-process entry; the second reads
    it with no reference forward on any process; both log the 1-process losses."""
    one, _, _ = run(str(tmp_path / "one"), 4, lora=lora, reference_cache_dir=str(tmp_path / "cache-one"))
    out, cache = tmp_path / "two", tmp_path / "cache-two"
    subprocess.run([*accelerate_launch(backend), "tests/reference_cache_driver.py", "--output_dir", str(out),
                    "--cache_dir", str(cache), *(["--lora"] if lora else [])], cwd=REPO, check=True, timeout=900)
    result = json.loads((out / "result.json").read_text())
    assert result["first"]["processes"] == 2
    assert result["first"]["reference_forwards"] == 8 and result["second"]["reference_forwards"] == 0
    (entry,) = _entries(cache)
    (entry_one,) = _entries(tmp_path / "cache-one")
    assert entry.name == entry_one.name  # the same key on 1 and 2 processes
    two_values, one_values = load_from_disk(str(entry / "logps")), load_from_disk(str(entry_one / "logps"))
    assert len(two_values) == 16
    for column in COLUMNS:
        assert two_values[column] == pytest.approx(one_values[column], abs=1e-6)
    for name in ("first", "second"):
        assert result[name]["losses"] == pytest.approx(one, abs=1e-5)


def test_refusals_that_reference_cache_dir_causes_name_it(tmp_path):
    """reference_cache_dir turns precompute on; the refusals it causes name reference_cache_dir, not only TRL's
    precompute_ref_log_probs that the user never set: image data (TRL precomputes nothing for vision rows) and D²O's
    online anchors with no reference to score them."""
    from test_d2o import _with_anchors
    from test_vlm import _pair_rows

    from prefalign.data import load_preference_dataset

    with pytest.raises(ValueError, match="reference_cache_dir=.* image"):
        PackedDPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"),
                         args=config(str(tmp_path / "vlm"), 4, reference_cache_dir=str(tmp_path / "c")),
                         train_dataset=_pair_rows(), processing_class=load_processing_class("tiny-qwen2-vl"))
    tokenizer = load_processing_class("tiny-causal-lm")
    args = D2OConfig(output_dir=str(tmp_path / "d2o"), report_to="none", use_cpu=True, bf16=False,
                     anchor_refresh_steps=1, reference_cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="reference_cache_dir=.*online anchors"):
        D2OTrainer(load_model("tiny-causal-lm"), None, args=args, train_dataset=_with_anchors(
            load_preference_dataset("wordnet-definitions", split="train").select(range(4)), 1),
                   processing_class=tokenizer)


def test_pair_mining_reuses_the_entry_of_a_plain_run(tmp_path):
    """pair_mining numbers the rows in a `row_index` column; the reference log-probs do not depend on it, so a mining
    run reads the entry a plain run wrote (no reference forward) and its stored values are the same."""
    cache = tmp_path / "cache"
    plain, plain_calls = _build(tmp_path / "plain", cache)
    mining, mining_calls = _build(tmp_path / "mining", cache, pair_mining="dbpm")
    assert plain_calls == 4 and mining_calls == 0 and len(_entries(cache)) == 1
    assert "row_index" in mining.train_dataset.column_names
    for column in COLUMNS:
        assert mining.train_dataset[column] == plain.train_dataset[column]
