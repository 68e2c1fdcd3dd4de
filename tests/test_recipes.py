"""The DPO recipe end to end on the tiny model: config parsing, validation before training, outputs that plain
transformers/peft load, resuming, and the `prefalign` CLI running the same code."""

import json
import math
import re
import runpy

import pytest
import torch
from conftest import REPO, log_history
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prefalign.cli import main as cli_main
from prefalign.data import PreferenceDataError
from prefalign.models import load_processing_class, resolve_model_path
from prefalign.recipe_args import parse_recipe_args

dpo_recipe = runpy.run_path(str(REPO / "recipes" / "dpo.py"))


def _assert_computes_like(saved, trained, tokenizer) -> None:
    """The saved model computes what the trained in-memory model computes (logits and greedy tokens), which is not
    what the untrained base model computes."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does the word 'dog' mean?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-causal-lm")).eval()
    saved, trained = saved.eval(), trained.eval()
    with torch.no_grad():
        logits = saved(**prompt).logits
        torch.testing.assert_close(logits, trained(**prompt).logits)
        assert not torch.allclose(logits, base(**prompt).logits)
        assert torch.equal(saved.generate(**prompt, max_new_tokens=5, do_sample=False),
                           trained.generate(**prompt, max_new_tokens=5, do_sample=False))


def test_default_config_is_cpu_friendly_and_overridable():
    from trl import DPOConfig, ModelConfig

    from prefalign.recipe_args import DataArguments

    data_args, training_args, model_args = parse_recipe_args((DataArguments, DPOConfig, ModelConfig), "dpo",
                                                             ["--beta", "0.3", "--max_steps", "7"])
    assert model_args.model_name_or_path == "smollm2-135m-instruct" and model_args.use_peft
    assert data_args.dataset_name == "wordnet-definitions"
    assert training_args.beta == 0.3 and training_args.max_steps == 7  # command line beats the YAML
    assert training_args.learning_rate == 5e-5  # from the YAML
    if not torch.cuda.is_available():
        assert not training_args.bf16


def test_lora_run_saves_an_adapter_that_plain_peft_loads(tiny_dpo_args, tmp_path):
    trainer = dpo_recipe["main"](tiny_dpo_args)
    out = tmp_path / "out"
    losses = [e["loss"] for e in log_history(out) if "loss" in e]
    assert len(losses) == 3
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at the reference: DPO loss = log 2
    assert (out / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-causal-lm"))
    model = PeftModel.from_pretrained(base, out)
    trained = trainer.model.state_dict()
    lora_b = [k for k in model.state_dict() if "lora_B" in k]
    assert lora_b and any(model.state_dict()[k].abs().sum() > 0 for k in lora_b)  # the adapter learned something
    assert set(lora_b) <= set(trained)  # the same names, so the comparison below covers every LoRA weight
    assert all(torch.equal(model.state_dict()[k], trained[k]) for k in lora_b)
    _assert_computes_like(model, trainer.model, load_processing_class("tiny-causal-lm"))


def test_full_model_run_saves_a_plain_checkpoint(tiny_dpo_args, tmp_path):
    trainer = dpo_recipe["main"]([*tiny_dpo_args, "--use_peft", "false"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    reference = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-causal-lm"))
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters())]
    assert any(changed)
    _assert_computes_like(model, trainer.model, load_processing_class(tmp_path / "out"))


def test_resume_continues_from_the_last_checkpoint(tiny_dpo_args, tmp_path, capsys):
    """One command resubmitted (docs/distributed.md): --resume_from_checkpoint true starts from scratch, saying so,
    while output_dir holds no checkpoint, and continues from the newest one once it does."""
    args = [*tiny_dpo_args, "--save_steps", "2", "--max_steps", "2", "--resume_from_checkpoint", "true"]
    assert dpo_recipe["main"](args).state.global_step == 2
    assert "no checkpoint in" in capsys.readouterr().out
    trainer = dpo_recipe["main"]([*tiny_dpo_args, "--save_steps", "2", "--max_steps", "4",
                                  "--resume_from_checkpoint", "true"])
    assert trainer.state.global_step == 4
    steps = [e["step"] for e in log_history(tmp_path / "out") if "loss" in e]
    assert steps == [1, 2, 3, 4]


def test_bad_data_stops_before_training_naming_row_and_column(tiny_dpo_args, tmp_path):
    rows = [{"prompt": "Define 'cat'.", "chosen": "A small feline.", "rejected": "A large bird."}] * 3
    rows.append({"prompt": "Define 'dog'.", "chosen": "A canine.", "rejected": "A canine."})
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceDataError, match=r"row 3, column 'chosen': chosen identical to rejected"):
        dpo_recipe["main"]([*tiny_dpo_args, "--dataset_name", str(path)])
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_bad_data_errors_name_the_file_and_split_before_training(tiny_dpo_args, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Define 'cat'.", "chosen": "A small feline.", "rejected": ""}] * 2  # every row invalid
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}, split 'train': every row is invalid")):
        dpo_recipe["main"]([*tiny_dpo_args, "--dataset_name", str(path), "--drop_invalid", "true"])
    path.write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "Define \'dog\'.", "chosen": "A canine."\n')
    with pytest.raises(PreferenceDataError, match=re.escape(f"{path}:2:")):
        dpo_recipe["main"]([*tiny_dpo_args, "--dataset_name", str(path)])
    assert not (tmp_path / "out").exists()


reward_wintie_recipe = runpy.run_path(str(REPO / "recipes" / "reward_wintie.py"))


def _win_tie_pairs_file(path):
    """Six win/tie pairs in a file; rows 1 (chosen), 4 (rejected) and 5 (both) have 200 words, far over 64 tokens."""
    long_text = " ".join(["word"] * 200)
    rows = []
    for i, (is_tie, long_sides) in enumerate([(False, ()), (False, ("chosen",)), (True, ()), (False, ()),
                                              (True, ("rejected",)), (True, ("chosen", "rejected"))]):
        rows.append({side: [{"role": "user", "content": f"Question {i} ({side})?"},
                            {"role": "assistant", "content": long_text if side in long_sides else "Short."}]
                     for side in ("chosen", "rejected")} | {"is_tie": is_tie})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_reward_wintie_recipe_names_or_counts_pairs_over_max_length(tmp_path, caplog):
    """TRL's RewardTrainer drops pairs over max_length without a count; the recipe stops naming them, or drops them
    with --drop_invalid and logs how many wins and ties went."""
    path = tmp_path / "pairs.jsonl"
    _win_tie_pairs_file(path)
    args = ["--model_name_or_path", "tiny-causal-lm", "--dataset_name", str(path), "--output_dir",
            str(tmp_path / "out"), "--max_length", "64", "--max_steps", "1", "--eval_strategy", "no",
            "--per_device_train_batch_size", "3", "--save_strategy", "no"]
    with pytest.raises(PreferenceDataError) as error:
        reward_wintie_recipe["main"](args)
    assert str(error.value).startswith(f"{path}, split 'train': 3 of 6 pairs (1 win, 2 tie) are longer than "
                                       "max_length=64 tokens")
    assert re.findall(r"row (\d+), column '(\w+)'", str(error.value)) == [
        ("1", "chosen"), ("4", "rejected"), ("5", "chosen"), ("5", "rejected")]
    assert not (tmp_path / "out").exists()

    with caplog.at_level("WARNING", logger="prefalign.data"):
        trainer = reward_wintie_recipe["main"]([*args, "--drop_invalid", "true"])
    assert f"{path}, split 'train': dropped 3 of 6 pairs longer than max_length=64 tokens (1 win, 2 tie); kept " \
           "2 win, 1 tie" in [r.getMessage() for r in caplog.records]
    assert trainer.train_dataset.num_rows == 3 and trainer.state.global_step == 1


def test_cli_train_runs_the_recipe(tiny_dpo_args, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prefalign"])
    cli_main(["train", "dpo", *tiny_dpo_args])
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_dpo_recipe_on_the_embedded_model(tmp_path):
    out = tmp_path / "smol"
    dpo_recipe["main"](["--output_dir", str(out), "--max_steps", "8", "--logging_steps", "1", "--save_steps", "8",
                        "--learning_rate", "2e-4", "--max_train_samples", "16", "--per_device_train_batch_size", "2"])
    history = [e for e in log_history(out) if "loss" in e]
    assert abs(history[0]["loss"] - 0.6931) < 1e-3
    # Eight steps over the same 16 pairs: the DPO loss falls and the margin grows on data it has seen.
    assert sum(e["loss"] for e in history[-3:]) / 3 < history[0]["loss"] - 0.02
    assert history[-1]["rewards/margins"] > 0


def test_generating_recipes_allow_answers_that_end():
    """d2o and delta_dpo drop cut-off answers, so their default limits must let most SmolLM2 answers end: measured
    4/32 sampled anchors and 0/8 greedy answers end within 48 tokens, 27/32 and 8/8 within 128."""
    import yaml

    d2o = yaml.safe_load((REPO / "recipes" / "configs" / "d2o.yaml").read_text())
    delta = yaml.safe_load((REPO / "recipes" / "configs" / "delta_dpo.yaml").read_text())
    assert d2o["anchor_max_new_tokens"] >= 128 and delta["pairs_max_new_tokens"] >= 128
    # prompt (< 64 tokens for the embedded data) + answer must fit in max_length, or the pair is cut again
    assert d2o["max_length"] >= d2o["anchor_max_new_tokens"] + 64
    assert delta["max_length"] >= delta["pairs_max_new_tokens"] + 64


@pytest.mark.parametrize(("recipe", "title", "arxiv_id"), [
    ("rrpo", "Self-alignment of Large Video Language Models with Refined Regularized Preference Optimization",
     "2504.12083"),
    ("dpo", "Direct Preference Optimization: Your Language Model is Secretly a Reward Model", "2305.18290"),
])
def test_saved_model_card_cites_the_trainers_paper(recipe, title, arxiv_id, tmp_path):
    """The README.md saved next to the trained model names the trainer and cites its paper (TRL's model card)."""
    out = tmp_path / "out"
    runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"](
        ["--model_name_or_path", "tiny-causal-lm", "--output_dir", str(out), "--max_steps", "1",
         "--max_train_samples", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no"])
    card = (out / "README.md").read_text()
    assert title in card and f"papers/{arxiv_id}" in card  # TRL links the paper by its arXiv id
    assert re.search(r"^@\w+\{", card, re.MULTILINE)  # a BibTeX entry
    if recipe == "rrpo":
        assert "Direct Preference Optimization" not in card  # not the parent DPOTrainer's paper


@pytest.mark.parametrize(("trainer", "page"), [
    ("RRPOTrainer", "rrpo"), ("D2OTrainer", "d2o"), ("DisentangledDPOTrainer", "disentangled"),
    ("WinTieRewardTrainer", "wintie"), ("PairwiseRMTrainer", "pairwise_rl"), ("PairwisePPOTrainer", "pairwise_rl"),
])
def test_every_trainer_carries_the_paper_its_docs_page_names(trainer, page):
    """Each trainer's `_paper` (read by TRL's model card) is the paper of its docs page: same title and arXiv id."""
    import prefalign

    paper = getattr(prefalign, trainer)._paper
    text = " ".join((REPO / "docs" / "methods" / f"{page}.md").read_text().split())
    title, arxiv_id = re.search(r'\*\*Paper\*\*: "([^"]+)", arXiv:(\d{4}\.\d{5})', text).groups()
    assert (paper["title"], paper["id"]) == (title, arxiv_id)
    assert f"eprint       = {{{arxiv_id}}}" in paper["citation"] and title in paper["citation"]


@pytest.mark.parametrize("flag", [["--load_in_4bit", "true"], ["--load_in_8bit", "true"],
                                  ["--bnb_4bit_quant_type", "fp4"], ["--use_bnb_nested_quant", "true"]])
def test_quantisation_flags_are_refused_at_start(tiny_dpo_args, tmp_path, flag):
    with pytest.raises(ValueError, match=f"{flag[0]} {flag[1].replace('true', 'True')}: quantised"):
        dpo_recipe["main"]([*tiny_dpo_args, *flag])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("recipe", ["dpo", "reward_wintie"])
def test_model_revision_and_attention_reach_from_pretrained(recipe, tiny_dpo_args, tmp_path, monkeypatch):
    """--model_revision and --attn_implementation are ModelConfig fields the recipes accept: both reach the model's
    from_pretrained (the reward recipe dropped both, the preference recipes dropped the revision)."""
    import transformers

    seen = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        original = auto.from_pretrained.__func__

        def spy(cls, *args, _original=original, **kwargs):
            seen.append((kwargs.get("revision"), kwargs.get("attn_implementation")))
            return _original(cls, *args, **kwargs)

        monkeypatch.setattr(auto, "from_pretrained", classmethod(spy))
    main = runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"]
    main([*tiny_dpo_args, "--max_steps", "1", "--model_revision", "main", "--attn_implementation", "eager",
          *(["--eval_strategy", "no"] if recipe == "reward_wintie" else [])])
    assert seen and all(s == ("main", "eager") for s in seen)
