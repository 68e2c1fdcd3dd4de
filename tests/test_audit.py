"""The audit builder: the probe's per-pair losses against a plain float64 recomputation, resume, flags and outputs."""

import json

import pytest
import torch
from conftest import LengthRewardModel
from peft import PeftModel

from data_builders import audit
from prefalign.data import load_preference_dataset
from prefalign.models import load_model, load_processing_class

NUM_PAIRS, BATCH = 12, 4


@pytest.fixture(scope="module")
def pairs():
    return load_preference_dataset("wordnet-definitions", split="train", max_samples=NUM_PAIRS)


def _plain_summed_logps(model, tokenizer, prompt, completion) -> float:
    """Σ log π(completion | prompt) in float64 from full logits, tokenised like TRL (chat template, eos appended)."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = logits[:-1].log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[len(prompt_ids) - 1:].sum())


def test_probe_losses_match_a_plain_recomputation(pairs, tmp_path):
    tokenizer = load_processing_class("tiny-causal-lm")
    history = audit.probe_loss_history(load_model("tiny-causal-lm"), tokenizer, pairs, tmp_path / "probe", epochs=2,
                                       beta=0.5, learning_rate=5e-3, batch_size=BATCH, max_length=256)
    assert history.shape == (NUM_PAIRS, 2)
    assert not torch.equal(history[:, 0], history[:, 1])  # the probe trained between the two readings
    # the last reading = the DPO loss of the saved adapter against the base model, recomputed from full logits
    base = load_model("tiny-causal-lm", dtype=torch.float64)
    last = sorted((tmp_path / "probe").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    policy = PeftModel.from_pretrained(load_model("tiny-causal-lm", dtype=torch.float64), str(last)).eval()
    for i in range(NUM_PAIRS):
        row = pairs[i]
        margin = 0.0
        for sign, side in ((1, "chosen"), (-1, "rejected")):
            margin += sign * (_plain_summed_logps(policy, tokenizer, row["prompt"], row[side])
                              - _plain_summed_logps(base, tokenizer, row["prompt"], row[side]))
        expected = float(-torch.nn.functional.logsigmoid(torch.tensor(0.5 * margin, dtype=torch.float64)))
        assert float(history[i, 1]) == pytest.approx(expected, rel=1e-4, abs=1e-5)


def test_interrupted_probe_resumes_to_the_uninterrupted_history(pairs, tmp_path, monkeypatch):
    tokenizer = load_processing_class("tiny-causal-lm")
    kwargs = dict(epochs=2, beta=0.5, learning_rate=5e-3, batch_size=BATCH, max_length=256)
    full = audit.probe_loss_history(load_model("tiny-causal-lm"), tokenizer, pairs, tmp_path / "full", **kwargs)

    original = audit._RecordPairLosses.on_epoch_end

    def crash_in_epoch_two(self, args, state, control, **kw):
        if round(state.epoch) == 2:
            raise KeyboardInterrupt("simulated kill")
        return original(self, args, state, control, **kw)

    monkeypatch.setattr(audit._RecordPairLosses, "on_epoch_end", crash_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        audit.probe_loss_history(load_model("tiny-causal-lm"), tokenizer, pairs, tmp_path / "cut", **kwargs)
    assert list(json.loads((tmp_path / "cut" / "losses.json").read_text())) == ["1"]
    monkeypatch.setattr(audit._RecordPairLosses, "on_epoch_end", original)
    resumed = audit.probe_loss_history(load_model("tiny-causal-lm"), tokenizer, pairs, tmp_path / "cut", **kwargs)
    assert resumed.flatten().tolist() == pytest.approx(full.flatten().tolist(), abs=1e-6)


def test_flag_pairs_by_hand():
    # 9 ordinary pairs (history 1, 1), one too hard (5, 5), one too easy (−3, −3) with E = 2: m = (0.5·ℓ1 + ℓ2)/2
    history = torch.tensor([[1.0, 1.0]] * 9 + [[5.0, 5.0], [-3.0, -3.0]], dtype=torch.float64)
    scores, flags = audit.flag_pairs(history, cut_noisy=2.0, cut_faulty=2.0)
    m = [0.75] * 9 + [3.75, -2.25]
    mu = sum(m) / 11
    sigma = (sum((x - mu) ** 2 for x in m) / 11) ** 0.5
    assert scores == pytest.approx([(x - mu) / sigma for x in m])
    assert flags == ["ok"] * 9 + ["suspect", "uninformative"]


def test_cli_writes_every_row_and_a_cleaned_copy(tmp_path, monkeypatch):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f" good answer {i}", "rejected": f" bad {i}"} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # A fixed history so the flags are known: pair 3 is far harder than the rest, pair 7 far easier.
    history = torch.ones(10, 1, dtype=torch.float64)
    history[3], history[7] = 9.0, -7.0
    monkeypatch.setattr(audit, "probe_loss_history", lambda *a, **k: history)
    monkeypatch.setattr("prefalign.models.load_model", lambda *a, **k: None)
    out = tmp_path / "audit"
    audit.main(["--dataset", str(data), "--output", str(out), "--model", "tiny-causal-lm", "--epochs", "1",
                "--cut-noisy", "1", "--cut-faulty", "1", "--drop-flagged"])
    audited = [json.loads(line) for line in (out / "audited.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in audited] == [r["prompt"] for r in rows]
    assert [r["flag"] for r in audited] == ["ok"] * 3 + ["suspect"] + ["ok"] * 3 + ["uninformative"] + ["ok"] * 2
    assert [r["epoch_losses"] for r in audited] == history.tolist()
    cleaned = [json.loads(line)["prompt"] for line in (out / "cleaned.jsonl").read_text().splitlines()]
    assert cleaned == [f"q{i}" for i in range(10) if i not in (3, 7)]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["pairs"], summary["ok"], summary["suspect"], summary["uninformative"]) == (10, 8, 1, 1)
    assert (out / "scores.png").stat().st_size > 0
    with pytest.raises(ValueError, match="other settings"):  # resuming with another β is refused
        audit.main(["--dataset", str(data), "--output", str(out), "--model", "tiny-causal-lm", "--epochs", "1",
                    "--beta", "0.3"])


def test_reward_model_losses_by_hand():
    from datasets import Dataset

    tokenizer = load_processing_class("tiny-causal-lm")
    rows = Dataset.from_list([{"prompt": "Q ", "chosen": "a b c", "rejected": "a"},
                              {"prompt": "Q ", "chosen": "a", "rejected": "a b c d"}])
    losses = audit.reward_model_losses(LengthRewardModel(), tokenizer, rows, batch_size=2, max_length=64)
    # one token per word, the same prompt and end tokens on both sides: margins 3 − 1 = 2 and 1 − 4 = −3
    expected = [float(-torch.nn.functional.logsigmoid(torch.tensor(m, dtype=torch.float64))) for m in (2.0, -3.0)]
    assert losses.shape == (2, 1) and losses[:, 0].tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match="row 1"):  # a side over max_length is named, not truncated
        audit.reward_model_losses(LengthRewardModel(), tokenizer, rows, batch_size=2, max_length=5)
