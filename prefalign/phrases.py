"""Phrases for RRPO: `<MASK>…</MASK>` tags, token-level diffs, and per-token phrase ids aligned with TRL's tokens.

A phrase pair (y+, y−) differs only in a few sub-sequences ("phrases"); phrase k of y+ is paired with phrase k of y−
(RRPO, arXiv:2504.12083; docs/methods/rrpo.md). The RRPO trainer and the phrase-pair builder
(data_builders/phrases.py) use these functions.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

from transformers import ProcessorMixin
from trl.data_utils import _tokenize, common_prefix_length, prepare_multimodal_messages

OPEN_TAG, CLOSE_TAG = "<MASK>", "</MASK>"
WORD_OR_PUNCTUATION = re.compile(r"\w+|[^\w\s]")

Span = tuple[int, int]


# ---------------------------------------------------------------------------------------------------------------
# Tags
# ---------------------------------------------------------------------------------------------------------------


def parse_phrase_tags(text: str, open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> tuple[str, list[Span]]:
    """Strip phrase tags; return the clean text and each phrase's [start, end) character span in it, in order."""
    pattern = re.compile(f"{re.escape(open_tag)}|{re.escape(close_tag)}")
    pieces, spans = [], []
    clean_length, cursor, open_at = 0, 0, None  # open_at: (position in text, position in clean text)
    for match in pattern.finditer(text):
        pieces.append(text[cursor : match.start()])
        clean_length += match.start() - cursor
        cursor = match.end()
        if match.group() == open_tag:
            if open_at is not None:
                raise ValueError(
                    f"nested {open_tag} at character {match.start()}: the {open_tag} at character {open_at[0]} "
                    f"is not closed yet, in {text!r:.200}"
                )
            open_at = (match.start(), clean_length)
        else:
            if open_at is None:
                raise ValueError(
                    f"{close_tag} at character {match.start()} has no opening {open_tag}, in {text!r:.200}"
                )
            spans.append((open_at[1], clean_length))
            open_at = None
    if open_at is not None:
        raise ValueError(f"{open_tag} at character {open_at[0]} is never closed, in {text!r:.200}")
    pieces.append(text[cursor:])
    return "".join(pieces), spans


def tag_phrases(text: str, spans: Sequence[Span], open_tag: str = OPEN_TAG, close_tag: str = CLOSE_TAG) -> str:
    """Wrap each [start, end) character span of `text` in tags: the inverse of `parse_phrase_tags`."""
    previous_end = 0
    for start, end in spans:
        if not previous_end <= start <= end <= len(text):
            raise ValueError(
                f"spans must be ordered, non-overlapping and within the text's {len(text)} characters: {list(spans)}"
            )
        previous_end = end
    pieces, cursor = [], 0
    for start, end in spans:
        pieces += [text[cursor:start], open_tag, text[start:end], close_tag]
        cursor = end
    pieces.append(text[cursor:])
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------------------------
# Diff
# ---------------------------------------------------------------------------------------------------------------


def _text_tokens(text: str, tokenizer: Any = None) -> tuple[list, list[Span]]:
    """Split text into comparable tokens with character offsets: the tokenizer's tokens, or words and punctuation."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoding["input_ids"]), [tuple(offset) for offset in encoding["offset_mapping"]]
    matches = list(WORD_OR_PUNCTUATION.finditer(text))
    return [m.group() for m in matches], [m.span() for m in matches]


def _covering_span(text: str, offsets: list[Span], first: int, last: int) -> Span:
    """Character span of tokens [first, last), whitespace trimmed; an empty span at the gap when there are none."""
    if first == last:
        position = offsets[first][0] if first < len(offsets) else len(text.rstrip())
        return position, position
    start, end = offsets[first][0], offsets[last - 1][1]
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def diff_phrases(chosen: str, rejected: str, tokenizer: Any = None) -> tuple[list[Span], list[Span]]:
    """Phrases where two texts differ, by a token-level diff: paired span lists, empty spans where a side has none."""
    chosen_tokens, chosen_offsets = _text_tokens(chosen, tokenizer)
    rejected_tokens, rejected_offsets = _text_tokens(rejected, tokenizer)
    matcher = difflib.SequenceMatcher(a=chosen_tokens, b=rejected_tokens, autojunk=False)
    chosen_spans, rejected_spans = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            chosen_spans.append(_covering_span(chosen, chosen_offsets, i1, i2))
            rejected_spans.append(_covering_span(rejected, rejected_offsets, j1, j2))
    return chosen_spans, rejected_spans


# ---------------------------------------------------------------------------------------------------------------
# Token ids
# ---------------------------------------------------------------------------------------------------------------


def _split_ids(processing_class: Any, prompt: str | list, completion: str | list) -> tuple[list[int], int]:
    """TRL 1.16 DPOTrainer's ids of one prompt + completion and where the completion's tokens start in them (the
    common prefix with the prompt's own ids: a prompt's last token merged into the completion's goes with it)."""
    generation_prompt = {"add_generation_prompt": True} if isinstance(prompt, list) else {}
    prompt_ids = list(_tokenize(processing_class, prompt, **generation_prompt)["input_ids"])
    full_ids = list(_tokenize(processing_class, prompt + completion)["input_ids"])
    return full_ids, common_prefix_length(prompt_ids, full_ids)


def _completion_ids(processing_class: Any, prompt: str | list, completion: str | list) -> list[int]:
    """The completion's token ids exactly as TRL 1.16's DPOTrainer tokenises one prompt/completion pair."""
    full_ids, start = _split_ids(processing_class, prompt, completion)
    return full_ids[start:]


def with_trl_eos(processing_class: Any, completion: str | list) -> str | list:
    """A string completion with the EOS TRL appends when it is missing; a message list as it is."""
    eos_token = getattr(processing_class, "tokenizer", processing_class).eos_token
    return completion + eos_token if isinstance(completion, str) and not completion.endswith(eos_token) else completion


def completion_start(processing_class: Any, prompt: str | list, completion: str | list) -> int:
    """Where TRL 1.16's DPOTrainer starts this completion's tokens: the number of the prompt's tokens kept before it
    (fewer than all when the prompt's last token merges into the completion's; a string completion gets TRL's EOS)."""
    return _split_ids(processing_class, prompt, with_trl_eos(processing_class, completion))[1]


def _offsets_by_encoding(tokenizer: Any, full_text: str, completion_ids: list[int], conversational: bool):
    """Character offsets (in `full_text`) of the completion tokens, if re-tokenising `full_text` gives the same ids."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    kwargs = {"add_special_tokens": False} if conversational else {}  # as apply_chat_template / TRL's _tokenize do
    encoding = tokenizer(full_text, return_offsets_mapping=True, **kwargs)
    ids, offsets = list(encoding["input_ids"]), [tuple(o) for o in encoding["offset_mapping"]]
    n = len(completion_ids)
    if n > len(ids) or ids[len(ids) - n :] != completion_ids:
        return None
    return offsets[len(ids) - n :]


def _offsets_by_decoding(tokenizer: Any, completion_ids: list[int]) -> tuple[str, list[Span]]:
    """Decode the completion ids one more token at a time; return the decoded text and each token's char offsets."""
    lengths = [
        len(tokenizer.decode(completion_ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        for i in range(len(completion_ids))
    ]
    for i in range(len(lengths) - 2, -1, -1):  # a token ending inside a multi-byte character decodes to U+FFFD
        lengths[i] = min(lengths[i], lengths[i + 1])
    decoded = tokenizer.decode(completion_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return decoded, [(lengths[i - 1] if i else 0, lengths[i]) for i in range(len(lengths))]


def phrase_token_ids(
    processing_class: Any, prompt: str | list, completion: str | list, spans: Sequence[Span]
) -> tuple[list[int], list[int]]:
    """Return (completion_ids as TRL's DPOTrainer tokenises them, phrase id per token: k inside span k-1, else 0).

    `completion` is a string (standard format; EOS is appended if missing, as TRL does) or a list holding one
    assistant message whose content is the clean text; `spans` are [start, end) character spans in that clean text.
    A token overlapping any character of a span is in that phrase (the first such span when it straddles two), so a
    token merged across a phrase boundary counts as phrase. Empty spans mark no token.
    """
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    conversational = isinstance(completion, list)
    if conversational:
        if len(completion) != 1 or not isinstance(completion[0].get("content"), str):
            raise ValueError(f"expected one assistant message with string content, got {completion!r:.200}")
        text = completion[0]["content"]
        messages = prompt + completion
        if isinstance(processing_class, ProcessorMixin):
            messages = prepare_multimodal_messages(messages)
        full_text = processing_class.apply_chat_template(messages, tokenize=False)
        text_start = full_text.rfind(text)
    else:
        text, completion = completion, with_trl_eos(processing_class, completion)
        full_text, text_start = prompt + completion, len(prompt)
    if any(not 0 <= start <= end <= len(text) for start, end in spans):
        raise ValueError(f"spans {list(spans)} fall outside the completion's {len(text)} characters")
    completion_ids = _completion_ids(processing_class, prompt, completion)

    offsets = _offsets_by_encoding(tokenizer, full_text, completion_ids, conversational) if text_start >= 0 else None
    if offsets is None:  # no offsets, or re-tokenising the rendered text differs: recover offsets by decoding
        decoded, offsets = _offsets_by_decoding(tokenizer, completion_ids)
        text_start = decoded.find(text)
        if text_start < 0:
            raise ValueError(f"cannot locate the completion text {text!r:.100} in its decoded tokens {decoded!r:.200}")
    return completion_ids, _phrase_ids_for_offsets(offsets, spans, text_start)


def _phrase_ids_for_offsets(offsets: Sequence[Span], spans: Sequence[Span], text_start: int) -> list[int]:
    """Phrase id of each token (char ``offsets``) given phrase ``spans`` of a text starting at ``text_start``."""
    phrase_ids = []
    for token_start, token_end in offsets:
        overlapping = (
            k
            for k, (start, end) in enumerate(spans, start=1)
            if start < end and token_start < text_start + end and token_end > text_start + start
        )
        phrase_ids.append(next(overlapping, 0))
    return phrase_ids


def rendered_phrase_ids(tokenizer: Any, rendered: str, text: str, spans: Sequence[Span]) -> list[int]:
    """Phrase id per token of ``rendered`` (a completion as the chat template renders it, tokenised on its own
    without special tokens, as TRL's vision collator does), where ``text`` with phrase ``spans`` sits inside it."""
    encoding = tokenizer(rendered, return_offsets_mapping=True, add_special_tokens=False)
    text_start = rendered.rfind(text)
    if text_start < 0:
        raise ValueError(f"cannot locate the completion text {text!r:.100} in {rendered!r:.200}")
    return _phrase_ids_for_offsets([tuple(o) for o in encoding["offset_mapping"]], spans, text_start)


def pair_phrase_spans(chosen: str, rejected: str, tokenizer: Any = None) -> tuple[str, list[Span], str, list[Span]]:
    """Clean texts and phrase spans of a pair: from ``<MASK>`` tags when either side has them, otherwise from a
    token-level diff. Spans are trimmed of surrounding whitespace (a space is never phrase). Raises ValueError (with
    the reason) when the pair cannot be aligned, or when no phrase has a visible character on either side."""
    if OPEN_TAG in chosen or OPEN_TAG in rejected:
        problem = alignment_problem(chosen, rejected)
        if problem is not None:
            raise ValueError(problem)
        (chosen, chosen_spans), (rejected, rejected_spans) = parse_phrase_tags(chosen), parse_phrase_tags(rejected)
        return chosen, trim_spans(chosen, chosen_spans), rejected, trim_spans(rejected, rejected_spans)
    chosen_spans, rejected_spans = diff_phrases(chosen, rejected, tokenizer)
    if chosen == rejected:
        raise ValueError("no phrase (rejected identical to chosen)")
    if not any(start < end for start, end in chosen_spans + rejected_spans):
        raise ValueError("no phrase (the texts differ only in whitespace)")
    return chosen, chosen_spans, rejected, rejected_spans


def trim_spans(text: str, spans: Sequence[Span]) -> list[Span]:
    """Each [start, end) span of ``text`` without its leading and trailing whitespace (empty if only whitespace)."""
    trimmed = []
    for start, end in spans:
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        trimmed.append((start, end))
    return trimmed


def alignment_problem(chosen: str, rejected: str) -> str | None:
    """Why a tagged pair cannot train RRPO (bad tags, no phrase, unequal counts, no change, only empty or
    whitespace phrases), or None."""
    try:
        chosen_text, chosen_spans = parse_phrase_tags(chosen)
        rejected_text, rejected_spans = parse_phrase_tags(rejected)
    except ValueError as error:
        return f"bad tags: {error}"
    if not chosen_spans or not rejected_spans:
        return "no phrase" + (" (rejected identical to chosen)" if chosen_text == rejected_text else "")
    if len(chosen_spans) != len(rejected_spans):
        return f"unequal phrase counts ({len(chosen_spans)} chosen, {len(rejected_spans)} rejected)"
    if chosen_text == rejected_text:
        return "rejected identical to chosen"
    if not chosen_text.strip() or not rejected_text.strip():
        return "empty completion"
    spans = trim_spans(chosen_text, chosen_spans) + trim_spans(rejected_text, rejected_spans)
    if not any(start < end for start, end in spans):
        return "no phrase token: every phrase is empty or whitespace"
    return None
