"""The pairwise generative reward model as a judge (Pairwise-RL, arXiv:2504.04950; docs/methods/pairwise_rl.md).

A causal LM is shown (question, response #1, response #2) in one user turn and answers with a verdict token, "1"
(the first is better) or "2": P(#1 ≻ #2) = sigmoid(z_1 − z_2) from the two verdict tokens' logits at the first
position of the assistant's reply. ``PairwiseRewardModel`` wraps a model trained by
``prefalign.trainers.pairwise_rm.PairwiseRMTrainer`` (or any instruct model): ``prob_first_better(q, a, b)`` and the
position-consistent ``reward(q, y, anchor)``, batched, with ``images`` (one list per context, shown before the judge
text, in both orders) for a vision-language model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from trl.data_utils import common_prefix_length

from prefalign.generation import prompt_token_ids, vision_prompt_inputs
from prefalign.losses import pairwise_reward
from prefalign.templates import PAIRWISE_PROMPT, VERDICT_LABELS, verdict_prompt


def verdict_token_ids(processing_class: Any, labels: Sequence[str] = VERDICT_LABELS) -> list[int]:
    """Token id that starts each verdict label right after the chat template's assistant prefix (what SFT trains)."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the pairwise RM reads its verdict at the start of the assistant's reply: its tokenizer "
                         "needs a chat template")
    probe = [{"role": "user", "content": "Which is better? Answer 1 or 2."}]
    prompt_ids = prompt_token_ids(processing_class, [probe])[0]
    ids = []
    for label in labels:
        text = processing_class.apply_chat_template(probe + [{"role": "assistant", "content": label}], tokenize=False)
        full = tokenizer(text, add_special_tokens=False)["input_ids"]
        start = common_prefix_length(prompt_ids, full)
        if start != len(prompt_ids) or start == len(full):
            raise ValueError(f"the verdict {label!r} does not start a new token after the assistant prefix; choose "
                             "other verdict labels")
        ids.append(full[start])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the verdict labels {labels} start with the same token; choose distinguishable labels")
    return ids


class PairwiseRewardModel:
    """A causal LM as a pairwise judge: verdict logits, P(#1 ≻ #2) and the position-consistent reward (docs/methods/pairwise_rl.md).

    ``model``: a loaded causal LM (``PreTrainedModel`` or ``PeftModel``), trained by ``PairwiseRMTrainer`` or any
    instruct model. ``template``: the judge prompt with ``{question}``, ``{first}``, ``{second}`` (must be the one the
    RM was trained with). ``batch_size``: contexts per forward (default 8). Contexts are not truncated.
    """

    def __init__(self, model: Any, processing_class: Any, template: str = PAIRWISE_PROMPT, batch_size: int = 8,
                 progress: bool = False):
        if batch_size < 1:
            raise ValueError(f"PairwiseRewardModel: batch_size must be ≥ 1, got {batch_size}")
        self.model, self.processing_class, self.template = model, processing_class, template
        self.batch_size, self.progress = batch_size, progress
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.verdict_ids = verdict_token_ids(processing_class)

    def prompt_verdict_logits(self, prompts: Sequence[list[dict[str, str]]],
                              images: Sequence[list] | None = None) -> torch.Tensor:
        """Verdict logits (first-better, second-better) of already rendered judge conversations: [N, 2] float32.
        ``images``: one list of images per conversation (shown before its text; needs the model's processor)."""
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"PairwiseRewardModel: {len(images)} image lists for {len(prompts)} contexts")
        ids = prompt_token_ids(self.processing_class, prompts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # little padding per batch
        logits = torch.empty(len(ids), 2)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in tqdm(range(0, len(order), self.batch_size), desc="Pairwise RM", unit="batch",
                                  disable=not self.progress):
                    batch = order[start : start + self.batch_size]
                    device = self.model.device
                    if images is not None:  # the model places its own (multimodal) positions
                        inputs = vision_prompt_inputs(self.processing_class, [prompts[i] for i in batch],
                                                      [images[i] for i in batch])
                        out = self.model(**{k: v.to(device) for k, v in inputs.items()}, logits_to_keep=1,
                                         use_cache=False)
                        logits[batch] = out.logits[:, -1, self.verdict_ids].float().cpu()
                        continue
                    width = max(len(ids[i]) for i in batch)
                    input_ids = torch.tensor([[self.pad_id] * (width - len(ids[i])) + ids[i] for i in batch])
                    mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch])
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    out = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                     position_ids=positions.to(device), logits_to_keep=1, use_cache=False)
                    logits[batch] = out.logits[:, -1, self.verdict_ids].float().cpu()
        finally:
            self.model.train(was_training)
        return logits

    def verdict_logits(self, questions: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any],
                       images: Sequence[list] | None = None) -> torch.Tensor:
        """Verdict logits (first-better, second-better) for each (image(s), question, response #1, response #2):
        [N, 2]."""
        for name, values in (("questions", questions), ("firsts", firsts), ("seconds", seconds)):
            if isinstance(values, str):
                raise TypeError(f"PairwiseRewardModel: {name} must be a sequence of items, got one string")
        if not len(questions) == len(firsts) == len(seconds):
            raise ValueError(f"PairwiseRewardModel: {len(questions)} questions, {len(firsts)} first and "
                             f"{len(seconds)} second responses")
        return self.prompt_verdict_logits([verdict_prompt(q, a, b, self.template)
                                           for q, a, b in zip(questions, firsts, seconds)], images)

    def prob_first_better(self, questions: Sequence[Any], firsts: Sequence[Any], seconds: Sequence[Any],
                          images: Sequence[list] | None = None) -> torch.Tensor:
        """P(#1 ≻ #2) = sigmoid(z_1 − z_2) for each ((image(s),) question, response #1, response #2): [N]."""
        logits = self.verdict_logits(questions, firsts, seconds, images)
        return torch.sigmoid(logits[:, 0] - logits[:, 1])

    def reward(self, questions: Sequence[Any], responses: Sequence[Any], anchors: Sequence[Any],
               images: Sequence[list] | None = None) -> torch.Tensor:
        """Position-consistent r(y) = ½·[P(y ≻ y*) + 1 − P(y* ≻ y)] of each response against its anchor: [N] in [0, 1].

        Both orders of every pair go through the RM in the same batches: 2 contexts per response, each with the
        question's ``images`` when given.
        """
        n = len(responses)
        logits = self.verdict_logits([*questions, *questions], [*responses, *anchors], [*anchors, *responses],
                                     None if images is None else [*images, *images])
        return pairwise_reward(logits[:n], logits[n:])
