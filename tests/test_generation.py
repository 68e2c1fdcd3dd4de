"""prefalign.generation.generate on the tiny model: order restored, left padding exact, chat templates and
instructions as rendered by hand, determinism for a seed, finish flags against a hand-written greedy loop, the device
a model given by name is placed on, the explicit vLLM backend (against a stand-in module) and the split of batches
across processes."""

import copy
import logging
import sys
import types

import pytest
import torch

import prefalign.generation as generation
from prefalign.generation import generate, with_instruction
from prefalign.models import load_model, load_processing_class, resolve_model_path

CHAT = [[{"role": "user", "content": "What does the word 'dog' mean?"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "What does the word 'high-handedness' mean, in a few plain English words?"}],
        [{"role": "user", "content": "Define 'cat'."}]]


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def model():
    """The tiny model in float64 with noise on its weights, so greedy answers are varied text (the untouched random
    model answers newlines only) and padding cannot flip an argmax through rounding."""
    model = copy.deepcopy(load_model("tiny-causal-lm", dtype=torch.float64))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _one_by_one(model, tokenizer, prompts, **kwargs):
    """Each prompt alone: no padding, no batching."""
    return [generate(model, tokenizer, [p], batch_size=1, progress=False, **kwargs)[0] for p in prompts]


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(model, tokenizer):
    batched = generate(model, tokenizer, CHAT, do_sample=False, max_new_tokens=10, batch_size=3, progress=False)
    assert batched == _one_by_one(model, tokenizer, CHAT, do_sample=False, max_new_tokens=10)
    assert len({answer[0] for answer in batched}) == len(CHAT) and all(answer[0] for answer in batched)


def test_conversational_prompts_use_the_chat_template(model, tokenizer):
    rendered = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in CHAT]
    assert rendered[0] == "<|im_start|>user\nWhat does the word 'dog' mean?<|im_end|>\n<|im_start|>assistant\n"
    as_text = generate(model, tokenizer, rendered, do_sample=False, max_new_tokens=10, progress=False)
    as_chat = generate(model, tokenizer, CHAT, do_sample=False, max_new_tokens=10, progress=False)
    assert as_text == as_chat  # the tiny tokenizer adds no BOS, so the two token sequences are the same


def test_instruction_is_a_system_message_or_a_paragraph(model, tokenizer):
    instruction = "Answer correctly and briefly."
    assert with_instruction("Q?", instruction) == "Answer correctly and briefly.\n\nQ?"
    system = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q?"}]
    assert with_instruction(system, instruction)[0]["content"] == "Answer correctly and briefly.\n\nBe kind."
    typed = [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]}, {"role": "user", "content": "Q?"}]
    merged = with_instruction(typed, instruction)  # one system message, not a second one (templates refuse that)
    assert len(merged) == 2 and merged[0]["content"] == [{"type": "text", "text": instruction},
                                                          {"type": "text", "text": "Be kind."}]
    by_hand = [[{"role": "system", "content": instruction}, *p] for p in CHAT]
    got = generate(model, tokenizer, CHAT, do_sample=False, max_new_tokens=10, instruction=instruction,
                   progress=False)
    assert got == generate(model, tokenizer, by_hand, do_sample=False, max_new_tokens=10, progress=False)
    assert got != generate(model, tokenizer, CHAT, do_sample=False, max_new_tokens=10, progress=False)


def test_sampling_is_deterministic_for_a_seed_and_keeps_the_callers_random_state(model, tokenizer):
    kwargs = dict(num_return_sequences=3, max_new_tokens=8, temperature=1.0, top_p=0.95, batch_size=2,
                  progress=False)
    torch.manual_seed(123)
    first = generate(model, tokenizer, CHAT, seed=7, **kwargs)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert generate(model, tokenizer, CHAT, seed=7, **kwargs) == first
    assert torch.equal(torch.rand(1), after)  # the caller's random stream is untouched
    assert generate(model, tokenizer, CHAT, seed=8, **kwargs) != first
    assert [len(answers) for answers in first] == [3] * len(CHAT)
    assert all(len(set(answers)) > 1 for answers in first)  # really sampled


def test_a_model_name_or_no_processing_class_is_refused(model, tokenizer):
    """Names are resolved at the edge: generate takes the loaded model and its processing class, nothing else."""
    with pytest.raises(TypeError, match="got the model name 'tiny-causal-lm'; load it first"):
        generate("tiny-causal-lm", tokenizer, ["Hi"], max_new_tokens=4, progress=False)
    with pytest.raises(ValueError, match="pass the model's processing_class"):
        generate(model, None, ["Hi"], max_new_tokens=4, progress=False)


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tokenizer, CHAT, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tokenizer, CHAT, batch_size=0)
    with pytest.raises(TypeError, match="prompt 1"):
        generate(model, tokenizer, ["ok", 3])


# ---- finish flags -----------------------------------------------------------------------------------------------

STRINGS = ["What does the word 'dog' mean?", "Hi", "Define 'cat'.", "Tell me a story", "x", "Why?",
           "A long question about many things?", "ok"]
END_LIKE = 793  # a token the noisy model picks greedily in half of STRINGS' answers (within 10 tokens)


@pytest.fixture(scope="module")
def ending_model(model, tokenizer):
    """The noisy model whose end token scores just above token END_LIKE, so some greedy answers end early."""
    ending = copy.deepcopy(model)
    with torch.no_grad():
        head = ending.get_output_embeddings().weight
        head[tokenizer.eos_token_id] = 1.05 * head[END_LIKE]
    return ending


def _greedy_by_hand(model, tokenizer, prompt: str, limit: int) -> list[int]:
    """Greedy decoding written out: argmax of a full forward pass, one token at a time, stop at the end token."""
    ids = tokenizer(prompt)["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(limit):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return new


def test_finish_flags_match_a_greedy_loop_by_hand(ending_model, tokenizer, caplog):
    limit = 5
    by_hand = [_greedy_by_hand(ending_model, tokenizer, p, limit) for p in STRINGS]
    expected = [tokenizer.eos_token_id in new for new in by_hand]
    assert 0 < sum(expected) < len(STRINGS)  # some answers end, some are cut off
    with caplog.at_level(logging.INFO, logger="prefalign.generation"):
        texts, finished = generate(ending_model, tokenizer, STRINGS, do_sample=False, max_new_tokens=limit,
                                   batch_size=3, progress=False, return_finished=True)
    assert finished == [[flag] for flag in expected]
    assert texts == [[tokenizer.decode(new, skip_special_tokens=True).strip()] for new in by_hand]
    cut = len(STRINGS) - sum(expected)
    assert f"{cut} of {len(STRINGS)} answer(s) reached max_new_tokens={limit}" in caplog.text
    assert generate(ending_model, tokenizer, STRINGS, do_sample=False, max_new_tokens=limit, progress=False) == texts


# ---- device placement -------------------------------------------------------------------------------------------


class _FakeState:
    """accelerate.PartialState as seen by process ``index`` of ``count`` on ``device``."""

    def __init__(self, device="cpu", index=0, count=1):
        self.device, self.process_index, self.num_processes = torch.device(device), index, count
        self.is_main_process = index == 0


def test_a_model_loaded_for_generation_goes_to_the_process_device(monkeypatch, tokenizer):
    """Under a launcher with GPUs accelerate's device is cuda:LOCAL_RANK; here a stand-in says cuda:1 and a spy on
    Module.to records where the model was sent (the move itself is skipped: no GPU here)."""
    monkeypatch.setattr("accelerate.PartialState", lambda: _FakeState("cuda:1"))
    moved = []

    def spy_to(self, *args, **kwargs):
        moved.append(torch.device(args[0] if args else kwargs["device"]))
        return self

    monkeypatch.setattr(torch.nn.Module, "to", spy_to)
    loaded, processing_class = generation.load_for_generation("tiny-causal-lm")
    got = generate(loaded, processing_class, ["Hi"], do_sample=False, max_new_tokens=2, progress=False)
    assert moved == [torch.device("cuda:1")] and len(got) == 1
    assert generation.process_device() == torch.device("cuda:1")


def test_a_loaded_model_on_the_cpu_with_an_accelerator_is_warned_about(monkeypatch, model, tokenizer, caplog):
    monkeypatch.setattr("accelerate.PartialState", lambda: _FakeState("cuda:0"))
    with caplog.at_level(logging.WARNING, logger="prefalign.generation"):
        generate(model, tokenizer, ["Hi"], do_sample=False, max_new_tokens=2, progress=False)
    assert "the model is on the CPU while this process has cuda:0" in caplog.text


# ---- backends ---------------------------------------------------------------------------------------------------


def test_vllm_is_an_explicit_choice_refused_when_missing(model, tokenizer):
    with pytest.raises(ImportError, match="backend='vllm' needs the vllm package"):
        generate("tiny-causal-lm", tokenizer, ["Hi"], backend="vllm")
    with pytest.raises(ValueError, match="unknown backend 'vlm'"):
        generate(model, tokenizer, ["Hi"], backend="vlm")


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in ``vllm`` module: engines record their construction and deletion; answers echo the prompt."""
    module = types.ModuleType("vllm")
    module.__spec__ = types.SimpleNamespace(name="vllm")
    module.made, module.freed = [], []

    class SamplingParams:
        def __init__(self, n, max_tokens, **kwargs):
            self.n, self.max_tokens = n, max_tokens

    class LLM:
        def __init__(self, model, seed=0):
            self.model = model
            module.made.append(model)

        def generate(self, prompts, params):
            outputs = []
            for prompt in prompts:
                length = len(prompt["prompt_token_ids"])
                reason = "length" if length > params.max_tokens else "stop"
                outputs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" {length} ",
                                                                                     finish_reason=reason)] * params.n))
            return outputs

        def __del__(self):
            module.freed.append(self.model)

    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(generation.importlib.util, "find_spec", lambda name: module.__spec__ if name == "vllm" else None)
    yield module
    generation.close_vllm_engines()


def test_vllm_engine_is_made_once_per_model_reused_and_freed(fake_vllm, tokenizer, model):
    prompts = ["Hi", "What does the word 'dog' mean?"]
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    path = resolve_model_path("tiny-causal-lm")  # vLLM loads the folder itself
    texts, finished = generate(path, tokenizer, prompts, num_return_sequences=2, max_new_tokens=3, backend="vllm",
                               return_finished=True)
    assert texts == [[str(n)] * 2 for n in lengths]
    assert finished == [[n <= 3] * 2 for n in lengths]
    generate(path, tokenizer, prompts, backend="vllm")
    assert fake_vllm.made == [path] and fake_vllm.freed == []  # one engine for two calls
    with pytest.raises(ValueError, match="needs the model's folder or hub id"):
        generate(model, tokenizer, prompts, backend="vllm")
    assert generation.close_vllm_engines() == 1
    assert fake_vllm.freed == fake_vllm.made  # released on close
    with generation.vllm_engines():
        generate(path, tokenizer, prompts, backend="vllm")
    assert len(fake_vllm.made) == 2 and fake_vllm.freed == fake_vllm.made


# ---- batches shared between processes ---------------------------------------------------------------------------


def test_batches_split_across_processes_give_the_one_process_answers(monkeypatch, model, tokenizer):
    """Two processes simulated in turn: each generates every other batch; gathering their answers gives exactly the
    one-process answers (sampling included), because each batch has its own seed."""
    kwargs = dict(num_return_sequences=2, max_new_tokens=6, batch_size=2, seed=11, progress=False,
                  return_finished=True)
    alone = generate(model, tokenizer, CHAT + STRINGS, **kwargs)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr("accelerate.PartialState", lambda rank=rank: _FakeState("cpu", rank, 2))
        monkeypatch.setattr("accelerate.utils.gather_object", lambda objects: (shares.append(list(objects)) or
                                                                               list(objects)))
        generate(model, tokenizer, CHAT + STRINGS, split_across_processes=True, **kwargs)
    assert len(shares[0]) + len(shares[1]) == len(CHAT + STRINGS) and shares[0] and shares[1]
    monkeypatch.setattr("accelerate.PartialState", lambda: _FakeState("cpu", 0, 2))
    monkeypatch.setattr("accelerate.utils.gather_object", lambda objects: shares[0] + shares[1])
    together = generate(model, tokenizer, CHAT + STRINGS, split_across_processes=True, **kwargs)
    assert together == alone
