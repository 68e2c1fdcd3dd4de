"""prefalign.generation.generate on the tiny model: order restored, left padding exact, chat templates and
instructions as rendered by hand, determinism for a seed."""

import copy

import pytest
import torch

from prefalign.generation import generate, with_instruction
from prefalign.models import load_model, load_processing_class

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


def test_string_prompts_and_a_model_name(tokenizer):
    """A short name loads the model with transformers when vLLM is absent; strings are tokenised as they are."""
    got = generate("tiny-causal-lm", None, ["What is a dog?", "Hi"], num_return_sequences=2, max_new_tokens=4,
                   progress=False)
    assert [len(a) for a in got] == [2, 2] and all(isinstance(t, str) for a in got for t in a)


def test_bad_arguments_are_refused(model, tokenizer):
    with pytest.raises(ValueError, match="greedy"):
        generate(model, tokenizer, CHAT, do_sample=False, num_return_sequences=2)
    with pytest.raises(ValueError, match="batch_size"):
        generate(model, tokenizer, CHAT, batch_size=0)
    with pytest.raises(TypeError, match="prompt 1"):
        generate(model, tokenizer, ["ok", 3])
