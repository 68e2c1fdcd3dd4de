"""`prefalign eval` (prefalign/evaluation.py): every number checked against a float64 brute force from full logits
on sequences tokenised independently (chat template + offsets), and the command run on the output of every recipe."""

import json
import math
import runpy

import pytest
import torch
from conftest import REPO, LengthRewardModel, perturbed_copy
from datasets import Dataset

from prefalign.data import load_preference_dataset
from prefalign.evaluation import evaluate_preferences, evaluate_reward_model, judge_win_rate
from prefalign.evaluation import main as eval_main
from prefalign.models import load_model, load_processing_class, resolve_model_path
from prefalign.reward_models import load_reward_model_and_processor

BETA = 0.3
PAIRS = [  # (question, chosen with <MASK> phrases, rejected) — phrases aligned one to one
    ("What does the word 'cat' mean?", "A small <MASK>domestic</MASK> feline.", "A small <MASK>wild</MASK> feline."),
    ("What does 'run' mean?", "To move <MASK>quickly</MASK> on foot.", "To move <MASK>slowly</MASK> on foot."),
    ("Define 'tree'.", "A <MASK>tall</MASK> plant with a <MASK>trunk</MASK>.",
     "A <MASK>short</MASK> plant with a <MASK>stem</MASK>."),
]


def _rows(tagged: bool) -> list[dict]:
    strip = (lambda s: s) if tagged else (lambda s: s.replace("<MASK>", "").replace("</MASK>", ""))
    return [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": strip(c)}],
             "rejected": [{"role": "assistant", "content": strip(r)}]} for q, c, r in PAIRS]


def _brute_force_side(model, base, tokenizer, question: str, tagged: str):
    """(Σ log π, Σ log π_base, Σ KL(π_base‖π), {phrase k: (Σ log π, Σ log π_base)}) of one completion, in float64
    from full logits; tokens as TRL tokenises (chat template of prompt+completion, prompt = generation prefix)."""
    spans, clean, pos = [], "", 0
    for part in tagged.replace("</MASK>", "<MASK>").split("<MASK>"):
        if pos % 2:
            spans.append((len(clean), len(clean) + len(part)))
        clean += part
        pos += 1
    messages = [{"role": "user", "content": question}]
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": clean}], tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    assert ids[:len(prompt_ids)] == prompt_ids
    text_start = full_text.rfind(clean)
    x = torch.tensor([ids])
    with torch.no_grad():
        logp = model(x).logits.double().log_softmax(-1)[0]
        base_logp = base(x).logits.double().log_softmax(-1)[0]
    total = base_total = kl = 0.0
    phrases = {}
    for t in range(len(prompt_ids), len(ids)):
        lp, blp = logp[t - 1, ids[t]].item(), base_logp[t - 1, ids[t]].item()
        total, base_total = total + lp, base_total + blp
        kl += (base_logp[t - 1].exp() * (base_logp[t - 1] - logp[t - 1])).sum().item()
        start, end = offsets[t]
        for k, (a, b) in enumerate(spans, start=1):
            if start < text_start + b and end > text_start + a:
                old = phrases.get(k, (0.0, 0.0))
                phrases[k] = (old[0] + lp, old[1] + blp)
                break
    return total, base_total, kl, phrases


@pytest.fixture(scope="module")
def models():
    base = load_model("tiny-causal-lm", dtype=torch.float32)
    return perturbed_copy(base, seed=3, scale=0.2), base, load_processing_class("tiny-causal-lm")


@pytest.mark.parametrize("tagged", [True, False])
def test_numbers_equal_a_float64_brute_force(models, tagged):
    model, base, tokenizer = models
    report = evaluate_preferences(model, base, tokenizer, Dataset.from_list(_rows(tagged)), beta=BETA, batch_size=2,
                                  progress=False)
    margins, kls, logp_right, phrase_right, phrase_logp_right = [], [], [], [], []
    for question, chosen, rejected in PAIRS:
        c, cb, ckl, cp = _brute_force_side(model, base, tokenizer, question, chosen)
        r, rb, _, rp = _brute_force_side(model, base, tokenizer, question, rejected)
        margins.append(BETA * ((c - cb) - (r - rb)))
        kls.append(ckl)
        logp_right.append(c > r)
        for k in sorted(set(cp) & set(rp)):
            phrase_right.append(BETA * (cp[k][0] - cp[k][1]) > BETA * (rp[k][0] - rp[k][1]))
            phrase_logp_right.append(cp[k][0] > rp[k][0])
    assert report["pairs"] == 3
    assert report["reward_margin"] == pytest.approx(sum(margins) / 3, abs=1e-4)
    assert report["reward_accuracy"] == sum(m > 0 for m in margins) / 3
    assert report["logp_accuracy"] == sum(logp_right) / 3
    assert report["kl_chosen"] == pytest.approx(sum(kls) / 3, rel=1e-4)
    assert report["kl_chosen"] > 0.01  # the perturbed model differs from its base
    if tagged:
        assert report["phrases"] == len(phrase_right) == 4 and report["phrase_pairs"] == 3
        assert report["phrase_accuracy"] == sum(phrase_right) / 4
        assert report["phrase_logp_accuracy"] == sum(phrase_logp_right) / 4
    else:
        assert report["phrases"] == 0 and report["phrase_accuracy"] is None


def test_the_base_against_itself_has_zero_margin_and_kl(models):
    _, base, tokenizer = models
    report = evaluate_preferences(base, base, tokenizer, Dataset.from_list(_rows(True)), progress=False)
    assert report["reward_margin"] == 0 and report["kl_chosen"] == pytest.approx(0, abs=1e-6)
    assert report["reward_accuracy"] == 0 and report["reward_ties"] == 3  # a tie is not a correct preference


def test_reward_model_accuracy_and_auc_by_hand():
    tokenizer = load_processing_class("tiny-causal-lm")
    rows = [{"prompt": "Q ", "chosen": "a b c d", "rejected": "a"},  # right
            {"prompt": "Q ", "chosen": "a", "rejected": "a b c"},  # wrong
            {"prompt": "Q ", "chosen": "a b c d e f", "rejected": "a b", "is_tie": False},
            {"prompt": "Q ", "chosen": "a", "rejected": "a b c d e f g h", "is_tie": True}]  # a tie: left out
    for row in rows:
        row.setdefault("is_tie", False)
    report = evaluate_reward_model(LengthRewardModel(), tokenizer, Dataset.from_list(rows), batch_size=3, progress=False)
    assert report["pairwise_accuracy"] == pytest.approx(2 / 3) and report["tie_pairs"] == 1
    # Scores are token counts, one token per word plus the same prompt and end tokens on every side, so by word
    # count: good (4, 1, 6) against bad (1, 3, 2): 3 + (½ + 0 + 0) + 3 of the 9 comparisons won.
    assert report["auc"] == pytest.approx(6.5 / 9)


def test_judge_win_rate_counts_ties_as_half():
    class Judge:
        def compare(self, prompt, a, b):
            return type("V", (), {"verdict": {"x": "first", "y": "tie", "z": "second"}[a]})

    result = judge_win_rate(Judge(), ["p"] * 4, ["x", "x", "y", "z"], ["b"] * 4)
    assert result == {"prompts": 4, "wins": 2, "ties": 1, "losses": 1, "win_rate": 2.5 / 4}


# ---- the command on the output of every recipe ----------------------------------------------------------------

COMMON = ["--model_name_or_path", "tiny-causal-lm", "--max_steps", "1", "--max_train_samples", "4",
          "--per_device_train_batch_size", "2", "--save_strategy", "no", "--eval_strategy", "no",
          "--learning_rate", "1e-2", "--warmup_steps", "0"]
RECIPES = {
    "dpo": [],
    "rrpo": [],
    "dpo_disentangled": ["--entanglement_steps", "0"],
    "d2o": ["--anchor_max_new_tokens", "4", "--anchor_warmup_steps", "0", "--anchor_refresh_steps", "0",
            "--anchor_keep_truncated", "true", "--num_anchors", "2"],
    "delta_dpo": ["--ladder", "tiny-causal-lm@temperature=1.0", "tiny-causal-lm@temperature=2.0",
                  "--pairs_max_new_tokens", "4", "--pairs_keep_truncated", "true"],
    "pairwise_rm": ["--max_eval_samples", "2", "--do_eval", "false"],
    "pairwise_ppo": ["--reward_model_name_or_path", "tiny-causal-lm", "--num_generations", "2",
                     "--max_completion_length", "4", "--anchor_keep_truncated", "true", "--max_train_samples", "2"],
    "reward_wintie": [],
}


# LoRA outputs of every recipe; full-model outputs of one preference recipe, RRPO and the reward model cover the
# other loading paths (the remaining full-model runs would only repeat them).
CASES = [(recipe, "true") for recipe in sorted(RECIPES)] + [(r, "false") for r in ("dpo", "rrpo", "reward_wintie")]


@pytest.mark.parametrize("recipe, use_peft", CASES)
def test_eval_runs_on_every_recipes_output(recipe, use_peft, tmp_path, capsys):
    out = tmp_path / "out"
    main = runpy.run_path(str(REPO / "recipes" / f"{recipe}.py"))["main"]
    main([*COMMON, *RECIPES[recipe], "--output_dir", str(out), "--use_peft", use_peft])
    data = "wordnet-phrases" if recipe == "rrpo" else "wordnet-definitions"
    args = ["--model", str(out), "--dataset", data, "--max-samples", "3", "--batch-size", "2"]
    if use_peft == "false" and recipe != "reward_wintie":
        args += ["--base", "tiny-causal-lm"]
    report = eval_main(args)
    saved = json.loads((out / f"eval_{data}.json").read_text())
    assert saved == report and report["pairs"] == 3
    if recipe == "reward_wintie":
        assert report["kind"] == "reward model" and 0 <= report["auc"] <= 1
    else:
        assert report["kind"] == "causal LM"
        assert resolve_model_path(report["base"]) == resolve_model_path("tiny-causal-lm")
        assert report["kl_chosen"] > 0 and math.isfinite(report["reward_margin"])  # one step moved the model
        assert (report["phrases"] > 0) == (recipe == "rrpo")


# ---- the recipes' --report ------------------------------------------------------------------------------------


def test_rrpo_report_before_and_after(tmp_path, capsys):
    from PIL import Image
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    main = runpy.run_path(str(REPO / "recipes" / "rrpo.py"))["main"]
    main(["--model_name_or_path", "tiny-causal-lm", "--output_dir", str(out), "--max_steps", "3",
                    "--logging_steps", "1", "--max_train_samples", "6", "--per_device_train_batch_size", "2",
                    "--save_strategy", "no", "--learning_rate", "1e-2", "--max_eval_samples", "4", "--report", "true",
                    "--report_max_new_tokens", "5"])
    report = json.loads((out / "report.json").read_text())
    before, after = report["before"], report["after"]
    assert before["pairs"] == after["pairs"] == 4 and report["dataset"] == "wordnet-phrases"
    assert before["kl_chosen"] == 0 and before["reward_margin"] == 0  # the base against itself
    assert after["kl_chosen"] > 0 and after["phrases"] == before["phrases"] > 0
    # the "after" numbers are the eval command's on the saved adapter
    evaluated = eval_main(["--model", str(out), "--dataset", "wordnet-phrases", "--max-samples", "4",
                           "--output", str(tmp_path / "e.json")])
    assert {k: evaluated[k] for k in after} == after
    # answers: two held-out prompts, the base's equal to plain greedy generation with the base
    tokenizer = load_processing_class("tiny-causal-lm")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-causal-lm"))
    assert len(report["answers"]) == 2
    for item, row in zip(report["answers"], load_preference_dataset("wordnet-phrases", "test", 2)):
        ids = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        new = base.generate(**ids, max_new_tokens=5, do_sample=False)[0, ids["input_ids"].shape[1]:]
        assert item["base"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    # the curves: a small PNG with the logged loss, margin and KL; the markdown printed and saved
    image = Image.open(out / "training_curves.png")
    assert image.size[0] <= 1000 and (out / "training_curves.png").stat().st_size < 100_000
    markdown = (out / "report.md").read_text()
    assert "![training curves](training_curves.png)" in markdown and "| base | trained |" in markdown
    assert markdown.split("KL(base")[1].split("\n")[0].endswith(f"| 0 | {after['kl_chosen']:.4g} |")
    assert markdown in capsys.readouterr().out


def test_reward_model_report(tmp_path):
    out = tmp_path / "out"
    main = runpy.run_path(str(REPO / "recipes" / "reward_wintie.py"))["main"]
    main([*COMMON, "--output_dir", str(out), "--max_eval_samples", "3", "--report", "true"])
    report = json.loads((out / "report.json").read_text())
    assert report["after"]["pairs"] == 3 and "answers" not in report
    model, tokenizer = load_reward_model_and_processor(str(out))
    assert report["after"] == evaluate_reward_model(model, tokenizer, load_preference_dataset("wordnet-definitions",
                                                                                              "test", 3))


def test_judge_option_compares_greedy_answers_with_trustjudge(tmp_path):
    from prefalign.generation import generate
    from prefalign.judges.judge import TrustJudge

    model_dir = tmp_path / "model"
    base = load_model("tiny-causal-lm")
    perturbed_copy(base, seed=5, scale=0.3).save_pretrained(model_dir)
    load_processing_class("tiny-causal-lm").save_pretrained(model_dir)
    report = eval_main(["--model", str(model_dir), "--base", "tiny-causal-lm", "--dataset", "wordnet-definitions",
                        "--max-samples", "3", "--judge", "--judge-model", "tiny-causal-lm", "--judge-prompts", "2",
                        "--max-new-tokens", "4"])
    # the same verdicts by hand: greedy answers of both models, judged in both orders by the judge
    tokenizer = load_processing_class("tiny-causal-lm")
    prompts = load_preference_dataset("wordnet-definitions", "test", 2)["prompt"]
    trained = load_model(str(model_dir))
    answers = [a[0] for a in generate(trained, tokenizer, prompts, max_new_tokens=4, do_sample=False, progress=False)]
    base_answers = [a[0] for a in generate(base, tokenizer, prompts, max_new_tokens=4, do_sample=False,
                                           progress=False)]
    judge = TrustJudge(load_model("tiny-causal-lm"), tokenizer)
    verdicts = [judge.compare(p, a, b).verdict for p, a, b in zip(prompts, answers, base_answers)]
    assert report["judge"] == {"model": "tiny-causal-lm", "prompts": 2, "wins": verdicts.count("first"),
                               "ties": verdicts.count("tie"), "losses": verdicts.count("second"),
                               "win_rate": (verdicts.count("first") + 0.5 * verdicts.count("tie")) / 2}


def test_bad_rows_and_image_data_are_refused_naming_them(models):
    model, base, tokenizer = models
    rows = _rows(True)
    rows[1]["rejected"] = [{"role": "assistant", "content": "To move <MASK>slowly on foot."}]  # unclosed tag
    with pytest.raises(ValueError, match=r"1 of 3 pairs cannot be evaluated:\n  row 1, columns 'chosen'/'rejected'"):
        evaluate_preferences(model, base, tokenizer, Dataset.from_list(rows), progress=False)
    with_images = Dataset.from_list([{**row, "images": []} for row in _rows(False)])
    with pytest.raises(NotImplementedError, match="text pairs"):
        evaluate_preferences(model, base, tokenizer, with_images, progress=False)


def test_models_with_scaled_logits_are_refused(models):
    import copy

    model, base, tokenizer = models
    scaled = copy.deepcopy(base)
    scaled.config.logit_scale = 0.5  # Cohere-style: the logits are multiplied after the head
    with pytest.raises(NotImplementedError, match="logit_scale"):
        evaluate_preferences(model, scaled, tokenizer, Dataset.from_list(_rows(False)), progress=False)


def test_pairs_are_tokenised_as_trls_dpo_trainer_also_across_a_merged_boundary(tmp_path):
    """A string prompt ending in a space: the tokenizer merges the space into the completions' first token, and TRL
    then cuts the prompt where prompt and completions diverge. `prefalign eval` must score the same ids (it put the
    whole prompt before completions that repeat the boundary)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from prefalign.evaluation import tokenize_pair

    tokenizer = load_processing_class("tiny-causal-lm")
    rows = Dataset.from_list([{"prompt": "What does 'cat' mean? ", "chosen": "A small feline.", "rejected": "Bird."},
                              {"prompt": "What does 'dog' mean?", "chosen": " A canine.", "rejected": " Fish."}])
    stock = DPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"),
                       args=DPOConfig(str(tmp_path), report_to="none", use_cpu=True, bf16=False),
                       train_dataset=rows, processing_class=tokenizer).train_dataset
    for i in range(len(rows)):
        ours = tokenize_pair(tokenizer, rows[i])
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert ours[key] == stock[i][key], (i, key)
        assert len(ours["chosen_phrase_ids"]) == len(ours["chosen_ids"])
