"""Batched text generation shared by data builders and online trainers: transformers by default, vLLM when present.

    texts = generate(model, tokenizer, prompts, num_return_sequences=4, max_new_tokens=64, temperature=0.8, top_p=0.9)
    texts[i][j]   # the j-th response to prompts[i]

Prompts are strings (tokenised as they are, like TRL's standard format) or lists of ``{"role", "content"}`` messages
(rendered with the chat template and a generation prompt, like TRL's conversational format). Batches are built from
prompts sorted by token length (left padding, little padding waste, the longest batch first so memory errors come
early) and the answers are returned in input order. Sampling is deterministic for a seed: the same prompts, seed and
batch size give the same texts, and the caller's random state is left untouched.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger("prefalign.generation")

Prompt = str | list[dict[str, Any]]


def with_instruction(prompt: Prompt, instruction: str | None) -> Prompt:
    """The prompt with ``instruction`` in front: a system message for chat prompts (merged into an existing one),
    or a paragraph before the text for string prompts. Unchanged when ``instruction`` is None or empty."""
    if not instruction:
        return prompt
    if isinstance(prompt, str):
        return f"{instruction}\n\n{prompt}"
    if prompt and prompt[0]["role"] == "system" and isinstance(prompt[0]["content"], str):
        return [{**prompt[0], "content": f"{instruction}\n\n{prompt[0]['content']}"}, *prompt[1:]]
    return [{"role": "system", "content": instruction}, *prompt]


def prompt_token_ids(processing_class: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each prompt as TRL tokenises it: chat template with generation prompt, or plain tokenisation."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    ids = []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            ids.append(tokenizer(prompt)["input_ids"])
        elif isinstance(prompt, list):
            text = processing_class.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            raise TypeError(f"prompt {index}: expected a string or a list of messages, got {type(prompt).__name__}")
    return ids


def generate(
    model: Any,
    processing_class: Any,
    prompts: Sequence[Prompt],
    num_return_sequences: int = 1,
    max_new_tokens: int = 128,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    batch_size: int = 8,
    seed: int = 0,
    instruction: str | None = None,
    progress: bool = True,
    desc: str = "Generating",
) -> list[list[str]]:
    """``num_return_sequences`` responses (stripped text, special tokens removed) to each prompt, in input order.

    ``model``: a loaded causal LM (a ``PreTrainedModel`` or ``PeftModel``), or a short name / hub id / path, which
    vLLM serves when it is installed and transformers loads otherwise. ``processing_class``: its tokenizer or
    processor (loaded from the name when None). ``batch_size``: prompts per ``generate`` call, each expanded to
    ``num_return_sequences`` sequences. ``top_k=0`` means no top-k filtering (transformers would otherwise apply its
    default of 50). ``instruction``: prepended to every prompt for generation only (see ``with_instruction``).
    ``do_sample=False`` is greedy decoding and allows one sequence per prompt only.
    """
    if num_return_sequences < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: num_return_sequences ({num_return_sequences}), batch_size ({batch_size}) and "
                         f"max_new_tokens ({max_new_tokens}) must all be ≥ 1")
    if not do_sample and num_return_sequences > 1:
        raise ValueError("generate: greedy decoding (do_sample=False) gives one response per prompt; "
                         f"got num_return_sequences={num_return_sequences}")
    if isinstance(model, str):
        from prefalign.models import load_model, load_processing_class, resolve_model_path

        processing_class = processing_class or load_processing_class(model)
        if importlib.util.find_spec("vllm") is not None:
            ids = prompt_token_ids(processing_class, [with_instruction(p, instruction) for p in prompts])
            return _generate_vllm(resolve_model_path(model), ids, num_return_sequences, max_new_tokens, do_sample,
                                  temperature, top_p, top_k, seed)
        model = load_model(model)
    if processing_class is None:
        raise ValueError("generate: pass the processing_class along with a loaded model")
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    ids = prompt_token_ids(processing_class, [with_instruction(p, instruction) for p in prompts])
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: ties keep input order
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    results: list[list[str]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    bar = tqdm(total=len(ids), desc=desc, unit="prompt", disable=not progress)
    new_tokens_total, start = 0, time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            for first in range(0, len(order), batch_size):
                batch = order[first : first + batch_size]
                width = max(len(ids[i]) for i in batch)
                input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch])
                attention_mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch])
                output = model.generate(
                    input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device),
                    max_new_tokens=max_new_tokens, do_sample=do_sample, num_return_sequences=num_return_sequences,
                    pad_token_id=pad_id, **sampling,
                )
                new = output[:, width:].cpu()
                new_tokens_total += _count_new_tokens(new, tokenizer.eos_token_id, pad_id)
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for row, index in enumerate(batch):
                    chunk = texts[row * num_return_sequences : (row + 1) * num_return_sequences]
                    results[index] = [text.strip() for text in chunk]
                bar.update(len(batch))
                bar.set_postfix(tokens_per_s=f"{new_tokens_total / max(time.perf_counter() - start, 1e-9):.1f}")
    finally:
        bar.close()
        model.train(was_training)
    return results


def _count_new_tokens(new: torch.Tensor, eos_id: int | None, pad_id: int) -> int:
    """Generated tokens up to and including each sequence's first EOS (the rest is padding)."""
    ended = torch.zeros(new.shape[0], dtype=torch.bool)
    count = 0
    for column in new.T:
        count += int((~ended).sum())
        ended |= (column == eos_id) if eos_id is not None else (column == pad_id)
    return count


def _generate_vllm(model_path: str, ids: list[list[int]], n: int, max_new_tokens: int, do_sample: bool,
                   temperature: float, top_p: float, top_k: int, seed: int) -> list[list[str]]:
    """vLLM branch, used only when vLLM is importable and ``generate`` got a model name or path.

    UNTESTED in this repository: vLLM is not installed on the project's machines (no GPU). Written against vLLM's
    documented offline API (``LLM.generate`` with token-id prompts and ``SamplingParams``); check it before relying
    on it. vLLM batches and orders requests itself; its outputs come back in request order.
    """
    from vllm import LLM, SamplingParams

    params = SamplingParams(n=n, max_tokens=max_new_tokens, seed=seed, temperature=temperature if do_sample else 0.0,
                            top_p=top_p if do_sample else 1.0, top_k=top_k if do_sample and top_k > 0 else -1)
    llm = LLM(model=model_path, seed=seed)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in ids], params)
    return [[completion.text.strip() for completion in output.outputs] for output in outputs]
