"""Delta learning (docs/methods/delta.md): the ladder pairing rule, drops counted, resumable shards, TRL's `sigmoid_norm` loss
against the §7 formula in float64, the recipe, and (slow) pairs from the embedded model at two decoding settings."""

import copy
import json
import logging
import math

import pytest
import torch
from conftest import log_history
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

import data_builders.delta as delta
from data_builders.delta import Rung, build_delta_pairs, ladder_pairs, parse_rung
from prefalign.data import PreferenceDataError, load_preference_dataset
from prefalign.generation import generate
from prefalign.models import load_model, load_processing_class

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


def _prompts(n: int) -> Dataset:
    return load_preference_dataset("wordnet-definitions", split="train").select(range(n))


# ---- ladder specs and the pairing rule ---------------------------------------------------------------------------


def test_rung_specs():
    assert parse_rung("m", max_new_tokens=32) == Rung("m", do_sample=False, max_new_tokens=32)
    assert parse_rung("org/m@temperature=1.5") == Rung("org/m", do_sample=True, temperature=1.5)
    assert parse_rung("m@top_k=5,do_sample=false,max_new_tokens=7") == Rung("m", top_k=5, max_new_tokens=7)
    assert parse_rung("/data/m@v2").model == "/data/m@v2"  # an '@' without settings is part of a path
    assert parse_rung("m@temperature=0.7").decoding() == dict(do_sample=True, temperature=0.7, top_p=1.0, top_k=0,
                                                              max_new_tokens=128)
    with pytest.raises(ValueError, match="bad setting 'beam=2'"):
        parse_rung("m@beam=2")
    with pytest.raises(ValueError, match="do_sample must be true or false"):
        parse_rung("m@do_sample=maybe")


def test_pairing_rule_over_a_three_rung_ladder_with_a_minimum_gap():
    assert ladder_pairs(["best", "mid", "worst"], 1) == ([(0, 1), (0, 2), (1, 2)], {})
    assert ladder_pairs(["best", "mid", "worst"], 2) == ([(0, 2)], {})
    pairs, dropped = ladder_pairs(["same", " ", "same "], 1)  # (0,1) empty, (0,2) identical, (1,2) empty
    assert pairs == [] and dropped == {"empty": 2, "identical": 1}
    pairs, dropped = ladder_pairs(["a", "a", "b", "c"], 2)  # candidates (0,2) (0,3) (1,3): none identical
    assert pairs == [(0, 2), (0, 3), (1, 3)] and not dropped


ANSWERS = {  # per model, per word: strongest first
    "strong": {"bra": "An undergarment.", "coppice": "A thicket of small trees.", "abseiler": "A climber.",
               "alimental": "Nourishing."},
    "mid": {"bra": "A garment.", "coppice": "A thicket of small trees.", "abseiler": "", "alimental": "Food."},
    "weak": {"bra": "A thing.", "coppice": "Trees.", "abseiler": "Someone.", "alimental": "Food."},
}


CUT_OFF = set()  # (model, word) answers that the scripted generate flags as cut off at max_new_tokens


def _scripted_generate(model, processing_class, prompts, **kwargs):
    """Each 'model' (a name) answers from ANSWERS, keyed by the word in the prompt; flags from CUT_OFF."""
    words = [p[-1]["content"].split("'")[1] for p in prompts]
    texts = [[ANSWERS[model][word]] for word in words]
    return (texts, [[(model, word) not in CUT_OFF] for word in words]) if kwargs.get("return_finished") else texts


def test_build_keeps_ordered_pairs_and_counts_drops(tmp_path, tokenizer, monkeypatch, caplog):
    """A 3-model ladder, min gap 1, four prompts: rows and drop counts as worked out by hand from ANSWERS."""
    monkeypatch.setattr(delta, "generate", _scripted_generate)
    dataset = _prompts(6).select([0, 2, 3, 4])  # bra, coppice, abseiler, alimental
    loaded = {name: (name, tokenizer) for name in ANSWERS}
    with caplog.at_level(logging.INFO, logger="prefalign.data_builders.delta"):
        pairs = build_delta_pairs(dataset, tmp_path, ["strong", "mid", "weak@temperature=0.7"], shard_size=3,
                                  loaded_models=loaded, progress=False)
    got = [(r["prompt_index"], r["chosen_rung"], r["rejected_rung"], r["chosen"][0]["content"],
            r["rejected"][0]["content"]) for r in pairs]
    assert got == [
        (0, 0, 1, "An undergarment.", "A garment."), (0, 0, 2, "An undergarment.", "A thing."),
        (0, 1, 2, "A garment.", "A thing."),
        (1, 0, 2, "A thicket of small trees.", "Trees."), (1, 1, 2, "A thicket of small trees.", "Trees."),
        (2, 0, 2, "A climber.", "Someone."),
        (3, 0, 1, "Nourishing.", "Food."), (3, 0, 2, "Nourishing.", "Food."),
    ]  # dropped: coppice strong = mid (identical), abseiler mid empty (2), alimental mid = weak (identical)
    summary = json.loads((tmp_path / "shards" / "train" / "summary.json").read_text())
    assert summary == {"candidates": 12, "kept": 8, "empty": 2, "identical": 2}
    assert ("12 candidate pairs: kept 8, dropped 0 with a side cut off at max_new_tokens, 2 with an empty answer, "
            "2 identical") in caplog.text
    row = pairs[1]
    assert row["prompt"] == [{"role": "user", "content": "What does the word 'bra' mean?"}]
    assert (row["chosen_model"], row["rejected_model"]) == ("strong", "weak")
    assert row["chosen_decoding"]["do_sample"] is False and row["rejected_decoding"]["temperature"] == 0.7
    assert (tmp_path / "train.jsonl").is_file() and len(load_preference_dataset(str(tmp_path), "train")) == 8


def test_pairs_with_a_cut_off_side_are_dropped_and_counted(tmp_path, tokenizer, monkeypatch, caplog):
    """The same ladder with two answers flagged cut off: every candidate pair using one is dropped as "truncated"
    (counted by hand below) before the empty/identical checks; keep_truncated keeps them."""
    monkeypatch.setattr(delta, "generate", _scripted_generate)
    CUT_OFF.update({("strong", "bra"), ("weak", "coppice")})
    try:
        dataset = _prompts(6).select([0, 2, 3, 4])
        loaded = {name: (name, tokenizer) for name in ANSWERS}
        kwargs = dict(ladder=["strong", "mid", "weak"], shard_size=3, loaded_models=loaded, progress=False)
        with caplog.at_level(logging.INFO, logger="prefalign.data_builders.delta"):
            pairs = build_delta_pairs(dataset, tmp_path / "drop", **kwargs)
        # bra: (0,1) (0,2) cut, (1,2) kept; coppice: (0,1) identical, (0,2) (1,2) cut; abseiler: 2 empty, 1 kept;
        # alimental: (0,1) (0,2) kept, (1,2) identical
        got = [(r["prompt_index"], r["chosen_rung"], r["rejected_rung"]) for r in pairs]
        assert got == [(0, 1, 2), (2, 0, 2), (3, 0, 1), (3, 0, 2)]
        summary = json.loads((tmp_path / "drop" / "shards" / "train" / "summary.json").read_text())
        assert summary == {"candidates": 12, "kept": 4, "truncated": 4, "empty": 2, "identical": 2}
        assert "kept 4, dropped 4 with a side cut off at max_new_tokens, 2 with an empty answer" in caplog.text
        kept = build_delta_pairs(dataset, tmp_path / "keep", keep_truncated=True, **kwargs)
        assert len(kept) == 8  # the counts of test_build_keeps_ordered_pairs_and_counts_drops
    finally:
        CUT_OFF.clear()


def test_a_ladder_model_given_by_name_is_placed_on_the_process_device(tmp_path, monkeypatch):
    """At the edge, a rung named by the command line goes to accelerate's device (a stand-in says cuda:1; a spy on
    Module.to records the move and skips it: no GPU here); below it, an unloaded rung is refused."""
    ladder = ["tiny-causal-lm@temperature=1.0", "tiny-causal-lm@temperature=2.0"]
    with pytest.raises(ValueError, match=r"ladder model\(s\) \['tiny-causal-lm'\] not loaded"):
        build_delta_pairs(_prompts(2), tmp_path, ladder, progress=False)
    state = type("State", (), {"device": torch.device("cuda:1"), "process_index": 0, "num_processes": 1,
                               "is_main_process": True})()
    monkeypatch.setattr("accelerate.PartialState", lambda: state)
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(torch.device(a[0])) or self)
    loaded = delta.load_ladder_models(ladder)
    assert list(loaded) == ["tiny-causal-lm"] and moved == [torch.device("cuda:1")]  # one model for both rungs
    assert delta.load_ladder_models(ladder, loaded=loaded) == loaded and len(moved) == 1  # kept, not loaded again
    build_delta_pairs(_prompts(2), tmp_path, ladder, max_new_tokens=3, keep_truncated=True, progress=False,
                      loaded_models=loaded)
    summary = json.loads((tmp_path / "shards/train/summary.json").read_text())
    assert summary["candidates"] == summary["kept"] == len(load_preference_dataset(str(tmp_path), "train")) == 2


def test_vllm_backend_is_explicit_and_refused_when_missing(tmp_path):
    with pytest.raises(ImportError, match="backend='vllm' needs the vllm package"):
        build_delta_pairs(_prompts(2), tmp_path, ["a", "b"], backend="vllm")


def test_judge_keeps_flips_or_drops(tmp_path, tokenizer, monkeypatch):
    """A stub judge's keep/flip/drop labels: 'flip' swaps the sides and their metadata, or drops the pair."""
    monkeypatch.setattr(delta, "generate", _scripted_generate)
    actions = iter(["keep", "flip", "drop"] * 10)
    monkeypatch.setattr("prefalign.judges.label_pairs",
                        lambda judge, prompts, chosen, rejected, min_margin, images=None: [next(actions) for _ in prompts])
    judge = type("Judge", (), {"model": load_model("tiny-causal-lm")})()
    loaded = {name: (name, tokenizer) for name in ANSWERS}
    kwargs = dict(ladder=["strong", "mid", "weak"], loaded_models=loaded, progress=False, judge=judge)
    flipped = build_delta_pairs(_prompts(1), tmp_path / "flip", judge_disagree="flip", **kwargs)
    assert [(r["chosen_rung"], r["rejected_rung"], r["judge_action"]) for r in flipped] == [(0, 1, "keep"),
                                                                                          (2, 0, "flip")]
    assert flipped[1]["chosen"][0]["content"] == "A thing." and flipped[1]["chosen_model"] == "weak"
    actions = iter(["keep", "flip", "drop"] * 10)
    dropped = build_delta_pairs(_prompts(1), tmp_path / "drop", **kwargs)
    assert len(dropped) == 1
    assert json.loads((tmp_path / "drop/shards/train/summary.json").read_text())["judge"] == 2


def test_bad_prompts_name_the_row_and_column(tmp_path, tokenizer):
    rows = Dataset.from_list([{"q": "Hi?"}, {"q": "  "}])
    with pytest.raises(PreferenceDataError, match="row 1, column 'q': empty prompt"):
        build_delta_pairs(rows, tmp_path, ["a", "b"], prompt_column="q")
    with pytest.raises(PreferenceDataError, match="no prompt column 'prompt'"):
        build_delta_pairs(rows, tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="min_rung_gap"):
        build_delta_pairs(rows, tmp_path, ["a", "b"], prompt_column="q", min_rung_gap=2)
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]
    assert delta.normalised_prompt(chat, 0, "messages", chat=True) == chat[:1]  # the answer turn is removed


# ---- resume ------------------------------------------------------------------------------------------------------


def test_interrupted_build_resumes_to_exactly_the_uninterrupted_rows(tmp_path, tokenizer, monkeypatch):
    """Real sampling on the tiny model (two temperatures), 10 prompts in 4 shards: stop after 2 shards, restart."""
    model = load_model("tiny-causal-lm")
    kwargs = dict(ladder=["tiny@temperature=0.8", "tiny@temperature=2.0"], max_new_tokens=6, shard_size=3,
                  batch_size=2, loaded_models={"tiny": (model, tokenizer)}, progress=False,
                  keep_truncated=True)  # the tiny random model never ends an answer
    dataset = _prompts(10)
    whole = build_delta_pairs(dataset, tmp_path / "whole", **kwargs).to_list()
    assert len(whole) >= 8 and len({r["prompt_index"] for r in whole}) >= 8

    written, original = [], delta.ShardStore.save

    def crash_after_two(store, index, value):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(store.path(index).name)
        original(store, index, value)

    monkeypatch.setattr(delta.ShardStore, "save", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_delta_pairs(dataset, tmp_path / "resumed", **kwargs)
    assert written == ["shard-00000.json", "shard-00001.json"]
    assert not (tmp_path / "resumed" / "train.jsonl").exists()

    calls = []
    monkeypatch.setattr(delta.ShardStore, "save",
                        lambda store, index, value: (calls.append(store.path(index).name), original(store, index, value)))
    resumed = build_delta_pairs(dataset, tmp_path / "resumed", **kwargs).to_list()
    assert calls == ["shard-00002.json", "shard-00003.json"]  # only the missing shards were generated
    assert resumed == whole

    with pytest.raises(ValueError, match="started with other settings.*seed"):
        build_delta_pairs(dataset, tmp_path / "resumed", **{**kwargs, "seed": 1})


# ---- the loss: TRL's sigmoid_norm is docs/methods/delta.md ---------------------------------------------------------------


def _section7_loss(policy, ref, batch, beta: float) -> torch.Tensor:
    """docs/methods/delta.md in float64 from full logits: z = (mean logπ(y_c) − mean logπ(y_r)) − (same under the reference),
    the means over response tokens; L = −logsigmoid(β·z), averaged over the pairs."""
    mask = batch["completion_mask"][:, 1:].double()
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    labels = batch["input_ids"][:, 1:].unsqueeze(-1)
    with torch.no_grad():
        means = []
        for model in (policy, ref):
            logp = model(**inputs).logits[:, :-1].double().log_softmax(-1).gather(-1, labels).squeeze(-1)
            means.append((logp * mask).sum(-1) / mask.sum(-1))
    n = mask.shape[0] // 2
    z = (means[0][:n] - means[0][n:]) - (means[1][:n] - means[1][n:])
    return -torch.nn.functional.logsigmoid(beta * z).mean()


def test_trl_sigmoid_norm_is_the_length_normalised_loss_in_float64(tmp_path, tokenizer):
    ref = load_model("tiny-causal-lm", dtype=torch.float64)
    policy = copy.deepcopy(ref)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    pairs = _prompts(8)
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid_norm"], beta=5.0, **COMMON)
    trainer = DPOTrainer(policy, ref, args=args, train_dataset=pairs, processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    lengths = batch["completion_mask"][:, 1:].sum(-1)
    assert len(set(lengths.tolist())) > 2  # responses of different lengths: normalisation matters
    with torch.no_grad():
        got = trainer.compute_loss(trainer.model, batch)
    expected = _section7_loss(policy, ref, batch, beta=5.0)
    assert abs(expected.item() - math.log(2)) > 1e-3  # policy and reference really differ
    # TRL's fused LM head projects in float32 (trl/trainer/utils.py), so agreement is to float32 precision
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    # the summed (plain DPO) loss at the same β is another number
    trainer.loss_types = ["sigmoid"]
    with torch.no_grad():
        assert abs(trainer.compute_loss(trainer.model, batch).item() - expected.item()) > 1e-3


# ---- the recipe --------------------------------------------------------------------------------------------------


def test_recipe_builds_pairs_once_and_trains(tmp_path, monkeypatch):
    """Tiny model as both rungs (two temperatures): pairs cached under output_dir, LoRA starts at log 2 and moves."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("delta_dpo_recipe", REPO / "recipes" / "delta_dpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "out"
    argv = ["--model_name_or_path", "tiny-causal-lm", "--ladder", "tiny-causal-lm@temperature=1.0",
            "tiny-causal-lm@temperature=2.0", "--pairs_max_new_tokens", "8", "--max_train_samples", "12",
            "--output_dir", str(out), "--max_steps", "3", "--save_steps", "3", "--logging_steps", "1",
            "--learning_rate", "5e-2", "--pairs_keep_truncated", "true"]
    recipe.main(argv)
    pairs = load_preference_dataset(str(out / "delta-pairs"), "train")
    assert len(pairs) == 12 and pairs[0]["rejected_decoding"]["temperature"] == 2.0
    losses = [e["loss"] for e in log_history(out) if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] != losses[0]
    assert (out / "adapter_model.safetensors").is_file()

    monkeypatch.setattr(delta, "generate", lambda *a, **k: pytest.fail("pairs were generated again"))
    recipe.main([*argv, "--output_dir", str(out), "--max_steps", "1"])  # the cached pairs are reused


# ---- prompts with images (tiny Qwen2-VL) ----------------------------------------------------------------------


def test_vision_prompts_build_pairs_that_the_recipe_trains_on(tmp_path, monkeypatch):
    """Image prompts (a jsonl of prompts naming PNG files, and a single `image` column in memory): every rung
    generates with each prompt's own picture, the rows name it, and the recipe trains delta DPO on the built rows
    (the tiny Qwen2-VL as both rungs and as the policy; LoRA starts at log 2 and moves)."""
    import importlib.util

    import numpy as np
    from conftest import REPO
    from PIL import Image

    pictures = [Image.new("RGB", (56, 56), (40 * i, 255 - 40 * i, 90)) for i in range(4)]
    question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    seen = []

    def recording_generate(model, processing_class, prompts, images=None, **kwargs):
        seen.append([[np.asarray(Image.open(p) if isinstance(p, str) else p) for p in row] for row in images])
        return generate(model, processing_class, prompts, images=images, **kwargs)

    monkeypatch.setattr(delta, "generate", recording_generate)
    # In memory, one `image` per row: the builder writes the pictures and the rows name them.
    vlm = (load_model("tiny-qwen2-vl"), load_processing_class("tiny-qwen2-vl"))
    ladder = ["tiny-qwen2-vl@temperature=1.0", "tiny-qwen2-vl@temperature=3.0"]
    built = build_delta_pairs(Dataset.from_list([{"prompt": question, "image": p} for p in pictures[:2]]),
                              tmp_path / "memory", ladder, max_new_tokens=4, keep_truncated=True, progress=False,
                              loaded_models={"tiny-qwen2-vl": vlm})
    assert len(seen) == 2 and all(len(rows) == 2 for rows in seen)  # one generate call per rung, 2 prompts each
    for rows in seen:
        for row, picture in zip(rows, pictures):
            assert len(row) == 1 and np.array_equal(row[0], np.asarray(picture))
    assert [r["prompt_index"] for r in built] == [0, 1]
    for row in built:
        assert row["images"] == [str(tmp_path / "memory" / "images" / f"row{row['prompt_index']:07d}-0.png")]
        assert np.array_equal(np.asarray(Image.open(row["images"][0])), np.asarray(pictures[row["prompt_index"]]))

    # Through the recipe: prompts file with image paths, pairs built by the ladder, then trained.
    folder = tmp_path / "prompts"
    folder.mkdir()
    for i, picture in enumerate(pictures):
        picture.save(folder / f"{i}.png")
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": question, "images": [str(folder / f"{i}.png")]})
                                                + "\n" for i in range(4)))
    spec = importlib.util.spec_from_file_location("delta_dpo_recipe", REPO / "recipes" / "delta_dpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    out = tmp_path / "out"
    seen.clear()
    trainer = recipe.main(["--model_name_or_path", "tiny-qwen2-vl", "--dataset_name", str(folder), "--ladder", *ladder,
                           "--pairs_max_new_tokens", "4", "--pairs_keep_truncated", "true", "--max_train_samples",
                           "4", "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "no",
                           "--logging_steps", "1",
                           "--learning_rate", "5e-2", "--per_device_train_batch_size", "2", "--report_to", "none",
                           "--warmup_steps", "0"])
    pairs = load_preference_dataset(str(out / "delta-pairs"), "train")
    assert len(pairs) == 4 and all(row["images"] == [str(folder / f"{row['prompt_index']}.png")] for row in pairs)
    assert [len(rows) for rows in seen] == [4, 4]
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(losses[1] - losses[0]) > 1e-4


# ---- slow: the embedded model at two decoding settings -----------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_greedy_over_hot_sampling(tmp_path):
    """SmolLM2 greedy (stronger) over SmolLM2 at temperature 1.5 (weaker): a handful of pairs, chosen = the greedy
    answer generated independently, metadata naming both decoding settings."""
    name = "smollm2-135m-instruct"
    model, processing_class = load_model(name), load_processing_class(name)
    dataset = _prompts(4)
    pairs = build_delta_pairs(dataset, tmp_path, [name, f"{name}@temperature=1.5"], max_new_tokens=16,
                              loaded_models={name: (model, processing_class)}, keep_truncated=True, progress=False)
    summary = json.loads((tmp_path / "shards" / "train" / "summary.json").read_text())
    assert summary["candidates"] == 4 and len(pairs) == summary["kept"] >= 3
    greedy = generate(model, processing_class, dataset["prompt"], do_sample=False, max_new_tokens=16,
                      batch_size=1, progress=False)
    for row in pairs:
        assert row["chosen"][0]["content"] == greedy[row["prompt_index"]][0]
        assert row["rejected"][0]["content"] not in ("", row["chosen"][0]["content"])
        assert row["chosen_decoding"]["do_sample"] is False and row["rejected_decoding"] == dict(
            do_sample=True, temperature=1.5, top_p=1.0, top_k=0, max_new_tokens=16)
        assert row["chosen_model"] == row["rejected_model"] == name


def test_recipe_refuses_to_generate_pairs_under_zero3(monkeypatch):
    """Under ZeRO-3 the models are partitioned at load: generating the pairs is refused at start, with the way out."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("delta_dpo_recipe", REPO / "recipes" / "delta_dpo.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    monkeypatch.setattr(recipe, "is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(ValueError, match="build them first.*--build_pairs false"):
        recipe.delta_pairs(recipe.DataArguments(), recipe.DeltaArguments(), "train", 2, {}, None, None)
