"""The text (and images) of prompts, completions and messages in TRL's two data formats: a string (standard format)
or a list of ``{"role", "content"}`` messages (conversational format), a message's content being a string or a list
of parts (``{"type": "text", "text": ...}``, ``{"type": "image", ...}``). See docs/data.md.

Three meanings of "the text", each with its own function:
- ``content_text``: one message's content, its text parts joined (images dropped);
- ``conversation_text``: a whole prompt or response as plain text for a judge's prompt (one message: its text;
  several: ``role: text`` paragraphs);
- ``completion_text``: the completion's own words, the last message's single text part; ``with_completion_text``
  puts new words back in the same format.

Ground floor: imports nothing from prefalign.
"""

from __future__ import annotations

from typing import Any


def content_text(content: str | list) -> str:
    """The text of one message's content: the string itself, or its text parts joined (other parts dropped)."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text") or "" for part in content if isinstance(part, dict))


def conversation_text(value: Any) -> str:
    """Plain text of a prompt or response: a string as it is; messages (or one message dict): one message gives its
    text, several give ``role: text`` paragraphs. Raises TypeError for anything else."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        raise TypeError(f"expected a string or a list of {{'role', 'content'}} messages, got {value!r:.80}")
    if len(value) == 1:
        return content_text(value[0]["content"])
    return "\n\n".join(f"{m.get('role', 'user')}: {content_text(m['content'])}" for m in value)


def completion_text(completion: str | list) -> str:
    """The words of a completion: the string, or its last message's content (a string or exactly one text part)."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if part.get("type") == "text"]
    if len(texts) != 1:
        raise ValueError(f"expected one text part in the completion, got {len(texts)}")
    return texts[0]


def with_completion_text(completion: str | list, text: str) -> str | list:
    """``completion`` in the same format (and with the same non-text parts), holding ``text`` as its words."""
    if isinstance(completion, str):
        return text
    content = completion[-1]["content"]
    if not isinstance(content, str):
        content = [{**part, "text": text} if part.get("type") == "text" else part for part in content]
    else:
        content = text
    return [*completion[:-1], {**completion[-1], "content": content}]


def embedded_images(value: Any) -> list:
    """The image objects embedded in a conversational value's parts (``{"type": "image", "image": ...}``), in order;
    [] for a string."""
    if not isinstance(value, list):
        return []
    return [part["image"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), list)
            for part in m["content"] if isinstance(part, dict) and part.get("type") == "image" and "image" in part]
