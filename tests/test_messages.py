"""The three "text of" helpers of prefalign.messages on both data formats, with values written out by hand."""

import pytest

from prefalign.messages import (
    completion_text,
    content_text,
    conversation_text,
    embedded_images,
    with_completion_text,
)

IMAGE = object()
PARTS = [{"type": "image", "image": IMAGE}, {"type": "text", "text": "What is "}, {"type": "text", "text": "this?"}]


def test_content_text_joins_text_parts_and_drops_images():
    assert content_text("Hi there") == "Hi there"
    assert content_text(PARTS) == "What is this?"
    assert content_text([{"type": "image"}]) == ""


def test_conversation_text_one_message_is_its_text_several_are_role_paragraphs():
    assert conversation_text("plain") == "plain"
    assert conversation_text([{"role": "user", "content": PARTS}]) == "What is this?"
    assert conversation_text({"role": "assistant", "content": "A cat."}) == "A cat."
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert conversation_text(chat) == "system: Be brief.\n\nuser: Hi"
    with pytest.raises(TypeError, match="expected a string or a list of"):
        conversation_text([{"role": "user"}])


def test_completion_text_is_the_last_message_and_round_trips():
    chat = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "last"}]
    assert completion_text(chat) == "last"
    assert with_completion_text(chat, "new") == [{"role": "assistant", "content": "first"},
                                                 {"role": "assistant", "content": "new"}]
    assert chat[-1]["content"] == "last"  # the input is not modified
    assert with_completion_text("old", "new") == "new"
    parts = [{"role": "assistant", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": "old"}]}]
    replaced = with_completion_text(parts, "new")
    assert replaced == [{"role": "assistant", "content": [{"type": "image", "image": IMAGE},
                                                          {"type": "text", "text": "new"}]}]
    assert completion_text(replaced) == "new"
    with pytest.raises(ValueError, match="expected one text part in the completion, got 2"):
        completion_text([{"role": "assistant", "content": PARTS}])


def test_embedded_images_in_order():
    second = object()
    chat = [{"role": "user", "content": PARTS}, {"role": "user", "content": [{"type": "image", "image": second}]}]
    assert embedded_images(chat) == [IMAGE, second]
    assert embedded_images("text with no images") == []
    assert embedded_images([{"role": "user", "content": "Hi"}]) == []
