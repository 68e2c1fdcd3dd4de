"""Batched text generation shared by data builders and online trainers: transformers by default, vLLM on request.

    texts = generate(model, tokenizer, prompts, num_return_sequences=4, max_new_tokens=64, temperature=0.8, top_p=0.9)
    texts[i][j]   # the j-th response to prompts[i]
    texts, finished = generate(..., return_finished=True)   # finished[i][j]: ended by an end token, not the limit

Prompts are strings (tokenised as they are, like TRL's standard format) or lists of ``{"role", "content"}`` messages
(rendered with the chat template and a generation prompt, like TRL's conversational format). Batches are built from
prompts sorted by token length (left padding, little padding waste, the longest batch first so memory errors come
early) and the answers are returned in input order. Sampling is deterministic for a seed: each batch is seeded from
(seed, batch number), so the same prompts, seed and batch size give the same texts however the batches are shared
between processes (``split_across_processes``), and the caller's random state is left untouched.

An answer that reaches ``max_new_tokens`` without an end token is cut off: it is counted in a log line, and
``return_finished=True`` returns the flags so that builders and trainers can drop it (they do by default) instead of
training it as a complete answer. Models are loaded at the edge (a builder's ``main``, a recipe, the CLI), e.g. with
``load_for_generation`` on the process's device (``process_device``); ``generate`` uses a loaded model where it is,
with a warning when that is the CPU while an accelerator is there (see docs/builders.md).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger("prefalign.generation")

Prompt = str | list[dict[str, Any]]
BACKENDS = ("transformers", "vllm")
_VLLM_ENGINES: dict[str, Any] = {}


def with_instruction(prompt: Prompt, instruction: str | None) -> Prompt:
    """The prompt with ``instruction`` in front: a system message for chat prompts (merged into an existing one),
    or a paragraph before the text for string prompts. Unchanged when ``instruction`` is None or empty."""
    if not instruction:
        return prompt
    if isinstance(prompt, str):
        return f"{instruction}\n\n{prompt}"
    if prompt and prompt[0]["role"] == "system":
        content = prompt[0]["content"]
        merged = (f"{instruction}\n\n{content}" if isinstance(content, str)  # text, or typed parts (VLM prompts)
                  else [{"type": "text", "text": instruction}, *content])
        return [{**prompt[0], "content": merged}, *prompt[1:]]
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


def process_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under a launcher with GPUs, ``cuda`` / ``mps`` / ``cpu`` alone
    (accelerate's ``PartialState().device``)."""
    from accelerate import PartialState

    return PartialState().device


def load_for_generation(name_or_path: str, **kwargs) -> tuple[Any, Any]:
    """A causal LM by short name, hub id or path, placed on ``process_device()``, with its processing class."""
    from prefalign.models import load_model, load_processing_class

    return load_model(name_or_path, **kwargs).to(process_device()), load_processing_class(name_or_path)


def _batch_seed(seed: int, batch: int) -> int:
    """The seed of one generation batch: a hash of (seed, batch number), so batches never share a stream."""
    return int(np.random.SeedSequence([seed, batch]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def _end_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end an answer: the generation config's ``eos_token_id`` (one or a list) and the
    tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, list | tuple) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
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
    backend: str = "transformers",
    return_finished: bool = False,
    split_across_processes: bool = False,
    images: Sequence[list] | None = None,
) -> list[list[str]] | tuple[list[list[str]], list[list[bool]]]:
    """``num_return_sequences`` responses (stripped text, special tokens removed) to each prompt, in input order;
    with ``return_finished``, also a flag per response: True when it ended with an end token before the limit.

    ``model``: a loaded causal LM (a ``PreTrainedModel`` or ``PeftModel``, used on its own device); with
    ``backend="vllm"``, the local folder or hub id that vLLM loads (``prefalign.models.resolve_model_path`` turns a
    short name into its folder). ``processing_class``: the model's tokenizer or processor. ``batch_size``: prompts per ``generate`` call, each expanded to
    ``num_return_sequences`` sequences. ``top_k=0`` means no top-k filtering (transformers would otherwise apply its
    default of 50). ``instruction``: prepended to every prompt for generation only (see ``with_instruction``).
    ``do_sample=False`` is greedy decoding and allows one sequence per prompt only. ``backend``: "transformers"
    (default) or "vllm" (one engine per model path, kept for later calls until ``close_vllm_engines``). ``split_across_processes``: a collective call, every process passes the same prompts,
    generates its share of the batches on its own device, and all get every answer (identical to one process).
    ``images``: one list of images (PIL images or file paths) per prompt, for a vision-language model; the
    ``processing_class`` must then be its processor, chat prompts hold one ``{"type": "image"}`` part per image
    (transformers backend only).
    """
    if num_return_sequences < 1 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"generate: num_return_sequences ({num_return_sequences}), batch_size ({batch_size}) and "
                         f"max_new_tokens ({max_new_tokens}) must all be ≥ 1")
    if not do_sample and num_return_sequences > 1:
        raise ValueError("generate: greedy decoding (do_sample=False) gives one response per prompt; "
                         f"got num_return_sequences={num_return_sequences}")
    if backend not in BACKENDS:
        raise ValueError(f"generate: unknown backend {backend!r}; expected one of {BACKENDS}")
    if processing_class is None:
        raise ValueError("generate: pass the model's processing_class (tokenizer or processor)")
    if backend == "vllm":
        if images is not None:
            raise ValueError("generate: images are supported by backend='transformers' only")
        check_vllm_available()
        if not isinstance(model, str):
            raise ValueError("generate: backend='vllm' needs the model's folder or hub id, not a loaded model (vLLM "
                             "loads its own copy); pass the path, or use backend='transformers'")
        if split_across_processes and _num_processes() > 1:
            raise ValueError("generate: backend='vllm' with split_across_processes in a multi-process run is not "
                             "supported; build the data in one process first (e.g. `prefalign build ...`)")
        ids = prompt_token_ids(processing_class, [with_instruction(p, instruction) for p in prompts])
        texts, finished = _generate_vllm(model, ids, num_return_sequences, max_new_tokens, do_sample, temperature,
                                         top_p, top_k, seed)
        _log_truncated(finished, max_new_tokens, desc)
        return (texts, finished) if return_finished else texts
    if isinstance(model, str):
        raise TypeError(f"generate: got the model name {model!r}; load it first (load_for_generation(name) gives the "
                        "model on this process's device and its processing class) and pass the loaded model")
    if model.device.type == "cpu" and process_device().type != "cpu":
        logger.warning("generate: the model is on the CPU while this process has %s; generation runs on the CPU "
                       "(move the model with .to(process_device()) first)", process_device())
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if images is not None and (len(images) != len(prompts) or not hasattr(processing_class, "image_processor")):
        raise ValueError(f"generate: images needs one list per prompt ({len(images)} for {len(prompts)} prompts) and "
                         f"the model's processor (got {type(processing_class).__name__})")
    ids = prompt_token_ids(processing_class, [with_instruction(p, instruction) for p in prompts])
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: ties keep input order
    batches = [order[first : first + batch_size] for first in range(0, len(order), batch_size)]
    rank, world = (_process_index(), _num_processes()) if split_across_processes else (0, 1)
    mine = [b for b in range(len(batches)) if b % world == rank]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    end_ids = torch.tensor(sorted(_end_token_ids(model, tokenizer)), dtype=torch.long)
    sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
    answers: list[tuple[int, list[str], list[bool]]] = []
    was_training = model.training
    model.eval()
    devices = [model.device] if model.device.type == "cuda" else []
    bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=desc, unit="prompt", disable=not progress)
    new_tokens_total, start = 0, time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for b in mine:
                torch.manual_seed(_batch_seed(seed, b))
                batch = batches[b]
                if images is None:
                    width = max(len(ids[i]) for i in batch)
                    input_ids = torch.tensor([[pad_id] * (width - len(ids[i])) + ids[i] for i in batch])
                    attention_mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch])
                    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
                else:
                    inputs = vision_prompt_inputs(processing_class, [with_instruction(prompts[i], instruction)
                                                               for i in batch], [images[i] for i in batch])
                    width = inputs["input_ids"].shape[1]
                output = model.generate(
                    **{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                    do_sample=do_sample, num_return_sequences=num_return_sequences, pad_token_id=pad_id, **sampling,
                )
                new = output[:, width:].cpu()
                ended = torch.isin(new, end_ids).any(dim=1).tolist()
                new_tokens_total += _count_new_tokens(new, end_ids)
                texts = tokenizer.batch_decode(new, skip_special_tokens=True)
                for row, index in enumerate(batch):
                    chunk = slice(row * num_return_sequences, (row + 1) * num_return_sequences)
                    answers.append((index, [text.strip() for text in texts[chunk]], ended[chunk]))
                bar.update(len(batch))
                bar.set_postfix(tokens_per_s=f"{new_tokens_total / max(time.perf_counter() - start, 1e-9):.1f}")
    finally:
        bar.close()
        model.train(was_training)
    if world > 1:
        from accelerate.utils import gather_object

        answers = gather_object(answers)
    results: list[list[str]] = [[] for _ in prompts]
    finished: list[list[bool]] = [[] for _ in prompts]
    for index, texts, ended in answers:
        results[index], finished[index] = texts, ended
    _log_truncated(finished, max_new_tokens, desc)
    return (results, finished) if return_finished else results


def vision_prompt_inputs(processor: Any, prompts: list[Prompt], images: list[list]) -> dict[str, torch.Tensor]:
    """A left-padded batch of prompts with their images, processed as TRL's vision collators process prompts."""
    from trl.data_utils import prepare_multimodal_messages

    texts = [processor.apply_chat_template(prepare_multimodal_messages(p, images=list(im)), tokenize=False,
                                           add_generation_prompt=True) if isinstance(p, list) else p
             for p, im in zip(prompts, images)]
    return dict(processor(text=texts, images=None if all(not im for im in images) else [list(im) for im in images],
                          padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False))


def _process_index() -> int:
    """This process's rank (0 without a launcher)."""
    from accelerate import PartialState

    return PartialState().process_index


def _num_processes() -> int:
    """The number of processes of this run (1 without a launcher)."""
    from accelerate import PartialState

    return PartialState().num_processes


def _log_truncated(finished: list[list[bool]], max_new_tokens: int, desc: str) -> None:
    """Log how many answers were cut off at ``max_new_tokens`` (no end token)."""
    cut = sum(not flag for flags in finished for flag in flags)
    if cut:
        logger.info("%s: %d of %d answer(s) reached max_new_tokens=%d without an end token (cut off)", desc, cut,
                    sum(len(flags) for flags in finished), max_new_tokens)


def _count_new_tokens(new: torch.Tensor, end_ids: torch.Tensor) -> int:
    """Generated tokens up to and including each sequence's first end token (the rest is padding)."""
    ended = torch.zeros(new.shape[0], dtype=torch.bool)
    count = 0
    for column in new.T:
        count += int((~ended).sum())
        ended |= torch.isin(column, end_ids)
    return count


def check_vllm_available() -> None:
    """Raise a clear ImportError when vLLM, asked for with ``backend='vllm'``, is not installed."""
    if importlib.util.find_spec("vllm") is None:
        raise ImportError("backend='vllm' needs the vllm package, which is not installed (pip install vllm, on a "
                          "machine with a supported GPU); or use backend='transformers'")


def vllm_engine(model_path: str, seed: int = 0) -> Any:
    """The vLLM engine of ``model_path``: made on first use, then reused by every later call."""
    if model_path not in _VLLM_ENGINES:
        from vllm import LLM

        logger.info("starting a vLLM engine for %s", model_path)
        _VLLM_ENGINES[model_path] = LLM(model=model_path, seed=seed)
    return _VLLM_ENGINES[model_path]


def close_vllm_engines() -> int:
    """Release every vLLM engine made by ``generate`` (GPU memory included); returns how many were closed."""
    closed = len(_VLLM_ENGINES)
    if not closed:
        return 0
    _VLLM_ENGINES.clear()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
    except ImportError:
        pass
    else:
        destroy_model_parallel()
        destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return closed


@contextlib.contextmanager
def vllm_engines() -> Iterator[None]:
    """A block whose vLLM engines are released at its end (``close_vllm_engines``), even on an error."""
    try:
        yield
    finally:
        close_vllm_engines()


def _generate_vllm(model_path: str, ids: list[list[int]], n: int, max_new_tokens: int, do_sample: bool,
                   temperature: float, top_p: float, top_k: int, seed: int) -> tuple[list[list[str]], list[list[bool]]]:
    """vLLM branch (``backend="vllm"``): the texts and finish flags (``finish_reason == "stop"``) per prompt.

    Tested here against a stand-in ``vllm`` module only (vLLM is not installed on the project's CPU machines);
    written against vLLM's documented offline API (``LLM.generate`` with token-id prompts and ``SamplingParams``,
    ``CompletionOutput.finish_reason``). vLLM batches and orders requests itself; outputs come in request order.
    """
    from vllm import SamplingParams

    params = SamplingParams(n=n, max_tokens=max_new_tokens, seed=seed, temperature=temperature if do_sample else 0.0,
                            top_p=top_p if do_sample else 1.0, top_k=top_k if do_sample and top_k > 0 else -1)
    outputs = vllm_engine(model_path, seed).generate([{"prompt_token_ids": prompt} for prompt in ids], params)
    texts = [[completion.text.strip() for completion in output.outputs] for output in outputs]
    finished = [[completion.finish_reason == "stop" for completion in output.outputs] for output in outputs]
    return texts, finished
