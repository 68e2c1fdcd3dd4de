"""Noisy-pair mining while training (docs/methods/noisy_pairs.md): the loss memory records exactly the rows a run
sees, DBPM weights match a hand computation, PLD draws match their probabilities, and the memory survives resume."""

import math
from types import SimpleNamespace

import pytest
import torch

from prefalign.data import load_preference_dataset
from prefalign.models import load_processing_class
from prefalign.reward_models import load_reward_model
from prefalign.trainers.pair_mining import MEMORY_FILE, PairMining, PairMiningArguments, PLDSampler
from prefalign.trainers.reward_wintie import WinTieRewardConfig, WinTieRewardTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, logging_steps=1, seed=0,
              learning_rate=5e-3, per_device_train_batch_size=2)


def _args(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{**PairMiningArguments().__dict__, **kw})


class SpyTrainer(WinTieRewardTrainer):
    """Before each training loss, computes each pair's −logsigmoid(r_c − r_r) by hand from a separate forward, and
    keeps (epoch, rows, hand losses, the trainer's loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            with torch.no_grad():
                rewards = model(input_ids=inputs["input_ids"],
                                attention_mask=inputs["attention_mask"]).logits.squeeze(-1).double().tolist()
            n = len(rewards) // 2
            hand = [math.log1p(math.exp(-(rewards[i] - rewards[n + i]))) for i in range(n)]
            rows = inputs["row_index"].tolist()
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.seen.append((self.pair_mining.epoch, rows, hand, result.item()))
        return result


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def pairs():
    return load_preference_dataset("wordnet-definitions", split="train").select(range(8))


def _trainer(tmp_path, tokenizer, pairs, cls=SpyTrainer, **kw):
    torch.manual_seed(0)
    args = WinTieRewardConfig(output_dir=str(tmp_path), **{**COMMON, "save_strategy": "no", **kw})
    trainer = cls(load_reward_model("tiny-causal-lm"), args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.seen = []
    return trainer


def _dbpm_by_hand(history: dict[int, list[float]], max_epochs: int, cut: float):
    """m_i = (1/t)·Σ_e (e/E)·ℓ_i^(e); μ, population σ; flags m ≤ μ − cσ or m ≥ μ + cσ, in plain floats."""
    m = {row: sum((e + 1) / max_epochs * loss for e, loss in enumerate(losses)) / len(losses)
         for row, losses in history.items()}
    mu = sum(m.values()) / len(m)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in m.values()) / len(m))
    flagged = {row for row, v in m.items() if v <= mu - cut * sigma or v >= mu + cut * sigma}
    return mu, sigma, flagged


def test_memory_records_the_rows_seen_and_dbpm_weights_by_hand(tmp_path, tokenizer, pairs):
    """Shuffled batches of 2 with gradient accumulation 2 over 3 epochs: each epoch the memory holds every row once,
    at the loss computed by hand at its visit; from epoch 2 on (warm-up 1) each step's loss is the mean of w·ℓ with
    DBPM's kernel weights computed by hand from the memory."""
    trainer = _trainer(tmp_path, tokenizer, pairs, pair_mining="dbpm", mining_warmup_epochs=1, mining_cut_noisy=0.8,
                       mining_cut_faulty=0.8, num_train_epochs=3, gradient_accumulation_steps=2)
    trainer.train()
    memory = trainer.pair_mining.memory.history
    assert sorted(memory) == list(range(8))
    orders = []
    for epoch in range(3):
        visits = [(row, loss) for e, rows, hand, _ in trainer.seen if e == epoch for row, loss in zip(rows, hand)]
        orders.append([row for row, _ in visits])
        assert sorted(orders[-1]) == list(range(8))  # every row exactly once
        for row, loss in visits:
            assert memory[row][epoch] == pytest.approx(loss, rel=1e-5)
    assert orders[0] != orders[1]  # really shuffled

    flagged_any = False
    for epoch in (1, 2):
        history = {row: [memory[row][e] for e in range(epoch)] for row in range(8)}
        mu, sigma, flagged = _dbpm_by_hand(history, 3, 0.8)
        flagged_any |= bool(flagged)
        for e, rows, hand, loss in trainer.seen:
            if e == epoch:
                weights = [math.exp(-((h - mu) ** 2) / (2 * sigma**2)) if row in flagged else 1.0
                           for row, h in zip(rows, hand)]
                assert loss == pytest.approx(sum(w * h for w, h in zip(weights, hand)) / len(hand), rel=1e-5)
    assert flagged_any
    logged = [e for e in trainer.state.log_history if "mining/mean_weight" in e]
    assert logged and any(e["mining/mean_weight"] < 1 for e in logged)
    final = _dbpm_by_hand({row: [memory[row][e] for e in range(3)] for row in range(8)}, 3, 0.8)[2]
    assert set(trainer.pair_mining.flags) == final


def test_pld_sampler_draws_match_probabilities(tmp_path):
    """Over 2,000 seeded epochs each pair's draw count is within 4 binomial standard deviations of n·k·p_i, with
    p_i = exp(−z_i)/Σ_group exp(−z_j) computed by hand from the last-seen losses."""
    mining = PairMining(_args(pair_mining="pld"))
    rows, groups = [10, 11, 12, 13, 14, 15], torch.tensor([0, 0, 0, 1, 1, 2])
    losses = {10: 0.2, 11: 0.9, 12: 0.4, 13: 0.7, 14: 0.1, 15: 0.5}
    for row, loss in losses.items():
        mining.memory.history[row] = {0: 5.0, 1: loss}  # the last-seen loss is epoch 1's
    probs = {}
    for members in ([10, 11, 12], [13, 14], [15]):
        values = [losses[r] for r in members]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        z = [(v - mean) / std if std > 0 else 0.0 for v in values]
        total = sum(math.exp(-x) for x in z)
        probs.update({r: math.exp(-x) / total for r, x in zip(members, z)})
    sampler = PLDSampler(mining, rows, groups, seed=0)
    assert len(sampler) == 6
    counts = dict.fromkeys(rows, 0)
    epochs = 2000
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        drawn = list(sampler)
        assert len(drawn) == 6
        for position in drawn:
            counts[rows[position]] += 1
    for row, size in zip(rows, (3, 3, 3, 2, 2, 1)):
        n = epochs * size
        expected, std = n * probs[row], math.sqrt(n * probs[row] * (1 - probs[row]))
        assert abs(counts[row] - expected) <= 4 * std + 1e-9, (row, counts[row], expected)
    assert counts[11] < counts[10]  # the hardest pair of its prompt is drawn least


def test_pld_warm_up_visits_every_pair_once():
    mining = PairMining(_args(pair_mining="pld", mining_warmup_epochs=2))
    sampler = PLDSampler(mining, list(range(5)), torch.tensor([0, 0, 1, 1, 1]), seed=3)
    assert sorted(sampler) == list(range(5))


@pytest.mark.parametrize("mode", ["dbpm", "pld"])
def test_memory_survives_save_and_resume(tmp_path, tokenizer, pairs, mode):
    """4 epochs uninterrupted vs 2 epochs, then a new trainer resumed from the epoch-2 checkpoint: the same memory
    and the same training losses after the resume point."""
    pairs = pairs.add_column("group_id", [0, 0, 0, 1, 1, 1, 2, 2])
    settings = dict(pair_mining=mode, mining_cut_noisy=0.8, mining_cut_faulty=0.8, num_train_epochs=4,
                    save_strategy="epoch")
    full = _trainer(tmp_path / "full", tokenizer, pairs, **settings)
    full.train()
    part = _trainer(tmp_path / "part", tokenizer, pairs, **settings)
    part.train()
    checkpoint = tmp_path / "part" / "checkpoint-8"  # 4 steps per epoch
    assert (checkpoint / MEMORY_FILE).is_file()
    resumed = _trainer(tmp_path / "part", tokenizer, pairs, **settings)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert _close(resumed.pair_mining.memory.history, full.pair_mining.memory.history)
    after = [loss for e, _, _, loss in full.seen if e >= 2]
    assert [loss for *_, loss in resumed.seen] == pytest.approx(after, rel=1e-6)
    if mode == "dbpm":
        assert resumed.pair_mining.flags == full.pair_mining.flags


def _close(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[r].keys() == b[r].keys() and all(
        math.isclose(a[r][e], b[r][e], rel_tol=1e-6) for e in a[r]) for r in a)


def test_pld_needs_prompt_groups(tmp_path, tokenizer, pairs):
    with pytest.raises(ValueError, match="needs a 'prompt' or a 'group_id' column"):
        _trainer(tmp_path, tokenizer, pairs.remove_columns("prompt"), pair_mining="pld")


class SpyDPO:
    """Mixin for PackedDPOTrainer: each training loss next to DPO's per-pair loss log(1 + exp(−β·margin)) computed by
    hand from plain forwards of the policy and the reference (log-softmax in float64 over completion tokens)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            def logps(m):
                with torch.no_grad():
                    logits = m(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
                token = torch.log_softmax(logits[:, :-1].double(), -1).gather(
                    -1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
                return (token * inputs["completion_mask"][:, 1:]).sum(-1).tolist()
            policy, reference = logps(model), logps(self.ref_model)
            n = len(policy) // 2
            hand = [math.log1p(math.exp(-self.beta * ((policy[i] - reference[i]) - (policy[n + i] - reference[n + i]))))
                    for i in range(n)]
            rows = inputs["row_index"].tolist()
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.seen.append((self.pair_mining.epoch, rows, hand, result.item()))
        return result


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_trainer_records_and_weights_pairs_by_hand(tmp_path, tokenizer, pairs, precompute):
    """PackedDPOTrainer with pair_mining='dbpm' (live or precomputed reference): the memory holds each row's DPO loss
    at its visit; from epoch 2 each step's loss is the mean of w·ℓ with DBPM's kernel weights computed by hand; and
    the trainer's gradient equals the gradient of that weighted mean built from plain forwards."""
    from prefalign.models import load_model
    from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer

    class Trainer(SpyDPO, PackedDPOTrainer):
        pass

    torch.manual_seed(0)
    model, ref = load_model("tiny-causal-lm"), load_model("tiny-causal-lm")
    args = PackedDPOConfig(output_dir=str(tmp_path), pair_mining="dbpm", mining_cut_noisy=0.8, mining_cut_faulty=0.8,
                           num_train_epochs=3, beta=0.5, save_strategy="no", precompute_ref_log_probs=precompute,
                           **{**COMMON, "learning_rate": 1e-2})
    trainer = Trainer(model, ref, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.seen = []
    trainer.train()
    memory = trainer.pair_mining.memory.history
    for epoch in range(3):
        visits = [(row, loss) for e, rows, hand, _ in trainer.seen if e == epoch for row, loss in zip(rows, hand)]
        assert sorted(row for row, _ in visits) == list(range(8))
        for row, loss in visits:
            assert memory[row][epoch] == pytest.approx(loss, rel=1e-4)
    flagged_any = False
    for epoch in (1, 2):
        mu, sigma, flagged = _dbpm_by_hand({row: [memory[row][e] for e in range(epoch)] for row in range(8)}, 3, 0.8)
        flagged_any |= bool(flagged)
        for e, rows, hand, loss in trainer.seen:
            if e == epoch:
                weights = [math.exp(-((h - mu) ** 2) / (2 * sigma**2)) if row in flagged else 1.0
                           for row, h in zip(rows, hand)]
                assert loss == pytest.approx(sum(w * h for w, h in zip(weights, hand)) / len(hand), rel=1e-4)
    assert flagged_any

    # gradient: one batch holding a flagged row, through the trainer and by hand (plain forward, autograd)
    mu, sigma, flagged = _dbpm_by_hand({row: [memory[row][e] for e in range(3)] for row in range(8)}, 3, 0.8)
    batch = next(b for b in trainer.get_train_dataloader() if set(b["row_index"].tolist()) & flagged)
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, dict(batch)).backward()
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()

    def logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (token * batch["completion_mask"][:, 1:]).sum(-1)
    policy = logps(trainer.model)
    with torch.no_grad():
        reference = logps(ref)
    n = len(policy) // 2
    losses = -torch.nn.functional.logsigmoid(0.5 * ((policy[:n] - reference[:n]) - (policy[n:] - reference[n:])))
    weights = torch.tensor([math.exp(-((h - mu) ** 2) / (2 * sigma**2)) if row in flagged else 1.0
                            for row, h in zip(batch["row_index"].tolist(), losses.tolist())])
    assert (weights < 1).any()
    (weights * losses).mean().backward()
    for name, grad in got.items():
        torch.testing.assert_close(grad, dict(trainer.model.named_parameters())[name].grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("other", [{"label_smoothing": 0.2}, {"f_divergence_type": "js_divergence"},
                                   {"f_divergence_type": "alpha_divergence"}], ids=["label_smoothing", "js", "alpha"])
def test_dpo_pair_mining_refuses_other_losses(tmp_path, other):
    """The memory records DPO's reverse-KL sigmoid loss per pair; any setting that makes TRL train another loss (an
    f-divergence too: its loss differs from the recorded one) is refused, not silently mixed with it."""
    from prefalign.trainers.dpo import PackedDPOConfig

    with pytest.raises(ValueError, match="needs loss_type='sigmoid', label_smoothing=0"):
        PackedDPOConfig(output_dir=str(tmp_path), pair_mining="dbpm", use_cpu=True, bf16=False, **other)


@pytest.mark.multiproc
def test_two_processes_agree_with_one(tmp_path):
    """The reward recipe with pair_mining='dbpm' for 3 epochs: 2 DDP processes × 2 pairs per step leave the same
    memory (every row, every epoch), the same flags and the same losses as 1 process × 4 pairs."""
    import json
    import runpy
    import subprocess
    from pathlib import Path

    from conftest import REPO, accelerate_launch
    from tiny_models import tiny_model_path

    torch.manual_seed(0)  # one score head for both runs: a saved reward model
    start = load_reward_model(tiny_model_path("tiny-causal-lm"))
    start.save_pretrained(tmp_path / "start")
    load_processing_class("tiny-causal-lm").save_pretrained(tmp_path / "start")
    args = ["--model_name_or_path", str(tmp_path / "start"), "--max_train_samples", "8", "--max_steps", "-1",
            "--num_train_epochs", "3", "--pair_mining", "dbpm", "--mining_cut_faulty", "0.5", "--mining_cut_noisy",
            "0.5", "--learning_rate", "5e-3", "--warmup_steps", "0", "--eval_strategy", "no", "--save_strategy",
            "epoch", "--save_total_limit", "1", "--logging_steps", "1", "--report_to", "none"]
    subprocess.run([*accelerate_launch("ddp.yaml"), "recipes/reward_wintie.py", *args, "--output_dir",
                    str(tmp_path / "two"), "--per_device_train_batch_size", "2"], cwd=REPO, check=True,
                   capture_output=True)
    recipe = runpy.run_path(str(Path(REPO) / "recipes" / "reward_wintie.py"))
    one = recipe["main"]([*args, "--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4"])

    def saved(folder):
        checkpoint = max(folder.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        memory = json.loads((checkpoint / MEMORY_FILE).read_text())["memory"]
        return memory, [e for e in state["log_history"] if "loss" in e]

    (memory_one, logs_one), (memory_two, logs_two) = saved(tmp_path / "one"), saved(tmp_path / "two")
    rows = {(row, epoch) for row, epoch, _ in memory_one["history"]}
    assert len(rows) == 3 * one.train_dataset.num_rows and memory_one["pending"] == memory_two["pending"] == []
    assert [(r, e) for r, e, _ in memory_two["history"]] == [(r, e) for r, e, _ in memory_one["history"]]
    assert [loss for *_, loss in memory_two["history"]] == pytest.approx([loss for *_, loss in memory_one["history"]],
                                                                         rel=1e-4, abs=1e-6)
    assert [e["loss"] for e in logs_two] == pytest.approx([e["loss"] for e in logs_one], rel=1e-3)
    assert [e["mining/faulty"] for e in logs_two] == [e["mining/faulty"] for e in logs_one]
    assert any(e["mining/faulty"] > 0 for e in logs_one)


def test_resume_true_without_a_checkpoint_is_refused(tmp_path, tokenizer, pairs):
    """resume_from_checkpoint=True with no checkpoint in output_dir stops, as the Trainer does without mining."""
    (tmp_path / "empty").mkdir()
    trainer = _trainer(tmp_path / "empty", tokenizer, pairs, pair_mining="dbpm", num_train_epochs=1)
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        trainer.train(resume_from_checkpoint=True)


def test_resume_from_a_checkpoint_without_memory_is_refused(tmp_path, tokenizer, pairs):
    plain = _trainer(tmp_path, tokenizer, pairs, cls=WinTieRewardTrainer, num_train_epochs=1, save_strategy="epoch")
    plain.train()
    mining = _trainer(tmp_path, tokenizer, pairs, pair_mining="dbpm", num_train_epochs=2)
    with pytest.raises(FileNotFoundError, match="pair_mining.json is missing"):
        mining.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---- the DPO-family trainers of prefalign: RRPO, D²O, disentangled ---------------------------------------------


class HookSpy:
    """Mixin for a PreferenceTrainer: keeps, per training batch, (epoch, rows, the per-pair losses handed to the
    pair-mining hook, what the hook returned, the step's loss)."""

    def _per_pair_loss_hook(self, losses, inputs):
        weighted = super()._per_pair_loss_hook(losses, inputs)
        if self.model.training:
            self.hooked.append([self.pair_mining.epoch, inputs["row_index"].tolist(), losses.detach().double().tolist(),
                                weighted.detach().double().tolist()])
        return weighted

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.model.training:
            self.hooked[-1].append(result.item())
        return result


def _family_trainer(name: str, tmp_path, **config):
    """A trainer of the family on 8 kept rows of 9 given (row 3 is dropped while preparing the data), batches of 2."""
    from datasets import Dataset

    from prefalign.models import load_model
    from prefalign.trainers.d2o import D2OConfig, D2OTrainer
    from prefalign.trainers.disentangled import DisentangledDPOConfig, DisentangledDPOTrainer
    from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

    source = load_preference_dataset("wordnet-phrases", split="train").select(range(9)).to_list()
    settings = {**COMMON, "learning_rate": 1e-2, "save_strategy": "no", "pair_mining": "dbpm",
                "mining_cut_noisy": 0.8, "mining_cut_faulty": 0.8, "num_train_epochs": 2, **config}
    if name == "rrpo":  # row 3 cannot be aligned (no difference): dropped and counted
        source[3]["rejected"] = source[3]["chosen"] = [{"role": "assistant", "content": "Same answer."}]
        cls, args = RRPOTrainer, RRPOConfig(output_dir=str(tmp_path), drop_unaligned=True, **settings)
    else:  # row 3's prompt fills max_length: TRL's (and D²O's) preparation drops it
        source[3]["prompt"] = [{"role": "user", "content": "word " * 400}]
        settings["max_length"] = 256
        if name == "d2o":
            source = [{"prompt": r["prompt"], "rejected": r["rejected"], "anchors": [r["chosen"]]} for r in source]
            cls = D2OTrainer
            args = D2OConfig(output_dir=str(tmp_path), num_anchors=1, anchor_refresh_steps=0, **settings)
        else:
            mode = "pngd" if name == "disentangled_pngd" else "anchored"
            cls, args = DisentangledDPOTrainer, DisentangledDPOConfig(output_dir=str(tmp_path), disentangle=mode,
                                                                      **settings)

    class Trainer(HookSpy, cls):
        pass

    torch.manual_seed(0)
    trainer = Trainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"), args=args,
                      train_dataset=Dataset.from_list(source), processing_class=load_processing_class("tiny-causal-lm"))
    trainer.hooked = []
    return trainer


KEPT_ROWS = [0, 1, 2, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("name", ["rrpo", "d2o", "disentangled", "disentangled_pngd"])
def test_family_trainers_weight_flagged_pairs_by_hand(tmp_path, name):
    """2 shuffled epochs, warm-up 1: epoch 1 records every kept row once (keyed by its row as given, the dropped row 3
    absent) at the loss the trainer computed, with weight 1; in epoch 2 each pair's loss is multiplied by
    exp(−(ℓ−μ)²/2σ²) when its epoch-1 history is flagged (μ, σ, flags by hand in float64 from m = ℓ⁽¹⁾·1/2), by 1
    otherwise, and the step's loss is the mean of those products."""
    trainer = _family_trainer(name, tmp_path)
    trainer.train()
    memory = trainer.pair_mining.memory.history
    assert sorted(memory) == KEPT_ROWS
    first = [(row, loss, weighted) for e, rows, losses, weighted, _ in trainer.hooked if e == 0
             for row, loss, weighted in zip(rows, losses, weighted)]
    assert sorted(row for row, *_ in first) == KEPT_ROWS
    for row, loss, weighted in first:
        assert memory[row][0] == loss and weighted == loss
    order = [row for row, *_ in first]
    assert order != sorted(order) or [r for e, rows, *_ in trainer.hooked if e == 1 for r in rows] != order

    m = {row: 0.5 * memory[row][0] for row in KEPT_ROWS}  # (1/t)·Σ (e/E)·ℓ with t = 1, E = 2
    mu = sum(m.values()) / len(m)
    sigma = math.sqrt(sum((v - mu) ** 2 for v in m.values()) / len(m))
    flagged = {row for row, v in m.items() if v <= mu - 0.8 * sigma or v >= mu + 0.8 * sigma}
    assert flagged and set(trainer.pair_mining.flags) != set()
    seen_flagged = 0
    for epoch, rows, losses, weighted, step_loss in trainer.hooked:
        if epoch != 1:
            continue
        weights = []
        for row, loss, got in zip(rows, losses, weighted):
            w = math.exp(-((loss - mu) ** 2) / (2 * sigma**2)) if row in flagged else 1.0
            seen_flagged += row in flagged
            assert got == pytest.approx(w * loss, rel=1e-5, abs=1e-7), (row, w)
            weights.append(w)
        assert step_loss == pytest.approx(sum(w * h for w, h in zip(weights, losses)) / len(losses), rel=1e-5)
    assert seen_flagged == len(flagged)  # every flagged row visited in epoch 2, once


def test_family_memory_is_restored_on_resume(tmp_path):
    """D²O, 2 epochs saved at each epoch end vs a new trainer resumed from the epoch-1 checkpoint: it reads the
    memory file, so its epoch-2 per-pair weights and losses, and its final memory, equal the uninterrupted run's."""
    full = _family_trainer("d2o", tmp_path / "full", save_strategy="epoch")
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-4"
    assert (checkpoint / MEMORY_FILE).is_file()
    resumed = _family_trainer("d2o", tmp_path / "resumed", save_strategy="no")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    after = [step for step in full.hooked if step[0] == 1]
    assert [step[:2] for step in resumed.hooked] == [step[:2] for step in after]
    for got, want in zip(resumed.hooked, after):
        assert [*got[2], *got[3], got[4]] == pytest.approx([*want[2], *want[3], want[4]], rel=1e-5)
    assert any(w < loss for step in after for loss, w in zip(step[2], step[3]))  # some pair was down-weighted
    assert _close(resumed.pair_mining.memory.history, full.pair_mining.memory.history)


@pytest.mark.multiproc
def test_pld_two_processes_share_the_draws_and_agree_with_one(tmp_path):
    """PackedDPOTrainer, pair_mining='pld' (warm-up 1, 3 epochs, 8 pairs in prompt groups of 3, 3 and 2): each epoch
    the full PLD draw (replayed from the memory of the epochs before) is split between 2 DDP ranks batch by batch
    (rank r takes batches r, r+2, …: disjoint shares that together are the draw), 1 process trains on exactly the
    draw, and both leave the same memory (every row, every epoch, same losses)."""
    import json
    import subprocess

    from conftest import REPO, accelerate_launch
    from pld_driver import EPOCHS, run

    subprocess.run([*accelerate_launch("ddp.yaml"), "tests/pld_driver.py", "--output_dir", str(tmp_path / "two")],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    two = json.loads((tmp_path / "two" / "pld.json").read_text())
    one = run(str(tmp_path / "one"))
    assert (one["processes"], two["processes"]) == (1, 2)
    later = False
    for epoch in range(EPOCHS):
        for result, batch in ((one, 4), (two, 2)):
            draw = result["draws"][epoch]
            assert len(draw) == 8
            for rank, batches in enumerate(result["trained"]):
                share = [draw[b * batch:(b + 1) * batch] for b in range(rank, len(draw) // batch, result["processes"])]
                assert batches[epoch] == share, (epoch, rank)
        assert one["draws"][epoch] == two["draws"][epoch]
        later |= epoch > 0 and sorted(one["draws"][epoch]) != list(range(8))  # with replacement, by PLD's p
    assert sorted(one["draws"][0]) == list(range(8))  # the warm-up epoch visits every pair once
    assert later
    assert one["memory"]["pending"] == two["memory"]["pending"] == []
    history_one, history_two = one["memory"]["history"], two["memory"]["history"]
    assert [(r, e) for r, e, _ in history_two] == [(r, e) for r, e, _ in history_one]
    assert {r for r, e, _ in history_one if e == 0} == set(range(8))
    assert [v for *_, v in history_two] == pytest.approx([v for *_, v in history_one], rel=1e-4, abs=1e-8)


def test_dpo_recipe_takes_pair_mining_padding_free_and_any_loss_type_from_the_command_line(tiny_dpo_args, tmp_path):
    """recipes/dpo.py trains PackedDPOTrainer: `--pair_mining dbpm --mining_warmup_epochs 1` over 2 epochs records
    every row per epoch, saves the memory in the epoch checkpoints and re-weights in epoch 2; `--loss_type ipo
    --padding_free true` runs packed, and LoRA's first IPO loss is (0 − 1/(2β))² = 25 at β = 0.1 (policy = reference)."""
    import json
    import runpy

    from conftest import REPO

    from prefalign.trainers.dpo import PackedDPOTrainer

    recipe = runpy.run_path(str(REPO / "recipes" / "dpo.py"))
    trainer = recipe["main"]([*tiny_dpo_args, "--max_steps", "-1", "--num_train_epochs", "2", "--max_train_samples",
                              "8", "--pair_mining", "dbpm", "--mining_warmup_epochs", "1", "--mining_cut_noisy", "0.5",
                              "--mining_cut_faulty", "0.5", "--save_strategy", "epoch", "--learning_rate", "5e-3", "--warmup_steps", "0"])
    assert isinstance(trainer, PackedDPOTrainer)
    history = trainer.pair_mining.memory.history
    assert sorted(history) == list(range(8)) and all(sorted(seen) == [0, 1] for seen in history.values())
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / MEMORY_FILE).read_text())["memory"]["history"]
    assert sorted((row, epoch) for row, epoch, _ in saved) == [(row, 0) for row in range(8)]
    weights = [e["mining/mean_weight"] for e in trainer.state.log_history if "mining/mean_weight" in e]
    assert weights[:2] == [1.0, 1.0] and min(weights[2:]) < 1  # epoch 1: warm-up; epoch 2: flagged pairs weigh less

    ipo = recipe["main"]([*tiny_dpo_args, "--output_dir", str(tmp_path / "ipo"), "--max_steps", "1", "--loss_type",
                          "ipo", "--padding_free", "true", "--save_strategy", "no"])
    assert ipo.padding_free and ipo.args.loss_type == ["ipo"]
    assert [e["loss"] for e in ipo.state.log_history if "loss" in e] == [pytest.approx(25.0, rel=1e-4)]
