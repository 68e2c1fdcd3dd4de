"""TrustJudge: a distribution-aware LLM-as-a-judge that reads the judge's probabilities (arXiv:2509.21117,
docs/methods/trustjudge.md).

    judge = TrustJudge(load_model("smollm2-135m-instruct"), load_processing_class("smollm2-135m-instruct"))
    judge.score(["What is 2+2?"], ["4"])                 # expected score on 1..100
    judge.compare("What is 2+2?", "4", "5").verdict     # "first", "second" or "tie"

How a score is read: the judge prompt asks for ``Rating: [[N]]``; the assistant turn is pre-filled up to
``Rating: [[`` (``direct`` style) or the judge first writes its rationale, greedily, up to ``max_reason_tokens``
(``reason_then_score`` style) and ``Rating: [[`` is appended after it. Every allowed answer ``N]]`` is then
teacher-forced: p(N) is the product of the probabilities of all its tokens INCLUDING the closing ``]]``, so that "8"
is not credited with the mass of "85". All answers are scored from one forward over the context (its KV cache kept)
plus one batched forward of the answers' tokens on copies of that cache, never one full forward per answer; answers
sharing a prefix ("8]]", "85]]") share a row. Pairwise verdicts are read the same way from ``Verdict: [[A|B|C]]``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from prefalign.judges.scoring import (
    VERDICTS,
    baseline_verdict,
    discrete_score,
    expected_score,
    geval_score,
    merge_pairwise,
    perplexity,
    ppl_verdict,
    renormalised,
    softmax_weighted_score,
)
from prefalign.messages import conversation_text, embedded_images
from prefalign.templates import JudgeTemplate

logger = logging.getLogger("prefalign.judges")

MODES = ("expected", "geval", "softmax_weighted", "discrete")
STYLES = ("direct", "reason_then_score")
PAIRWISE_MODES = ("likelihood", "ppl", "baseline")
MAX_SCALE_SIZE = 1000


@dataclass(frozen=True)
class Verdict:
    """A pairwise judgement of (A, B): the verdict and the probabilities it came from."""

    verdict: str
    """"first" (A better), "second" (B better) or "tie", by the judge's ``pairwise_mode``."""
    merged: dict[str, float]
    """m[k] = P1(k) + P2(swap k), in [0, 2] (docs/methods/trustjudge.md), whatever the mode."""
    probs_order1: dict[str, float]
    """Verdict distribution judging (A, B), renormalised over first/second/tie."""
    probs_order2: dict[str, float]
    """Verdict distribution judging (B, A), in that presentation order."""
    ppl_order1: float
    """Perplexity of the judge's output (rationale if any, then the top verdict) in order 1."""
    ppl_order2: float
    """Same for order 2."""

    @property
    def margin(self) -> float:
        """(m[first] − m[second]) / 2 in [−1, 1]: > 0 favours A."""
        return (self.merged["first"] - self.merged["second"]) / 2


@dataclass
class _Reading:
    """What the judge said for one context: raw p(label) (not renormalised), and its output's log-prob and length."""

    probs: dict[Any, float]
    output_logprob: float
    output_tokens: int


class TrustJudge:
    """Distribution-aware LLM-as-a-judge over any causal LM or VLM (arXiv:2509.21117, docs/methods/trustjudge.md).

    Parameters that control the score:
        scale: (low, high) inclusive integer scale Θ; default (1, 100), the paper's fine-grained scale.
        mode: ``expected`` (default: renormalise p over Θ, take the expectation), ``geval`` (Σ s·p over the top
            ``geval_top_k``, default all, with the raw p(s), not renormalised), ``softmax_weighted`` (log-odds of
            the raw p(s), temperature ``softmax_temperature``, 0.2) or ``discrete`` (top-1, the usual baseline).
        style: ``direct`` (default: the score follows the prompt) or ``reason_then_score`` (greedy rationale of at
            most ``max_reason_tokens`` tokens, default 128, then the score).

    Parameters that control pairwise verdicts:
        pairwise_mode: ``likelihood`` (default: merge both orders' probabilities), ``ppl`` (the lower-perplexity
            order's verdict, tie when the perplexities differ by ≤ ``ppl_tolerance``, default 0) or ``baseline``
            (each order's top-1; disagreement → tie).
        tie_margin: ``likelihood`` gives a tie when the top two merged values differ by ≤ 2·tie_margin; default 0
            (exact ties only).

    Parameters that control batching:
        batch_size: contexts per forward (default 8; 1 for VLMs, whose image positions are per sequence).
        candidate_batch_size: answer rows per continuation forward, each holding a copy of its context's KV cache
            (default 64; lower it when memory is short).
        progress: show a tqdm bar over batches.
    """

    def __init__(
        self,
        model: Any,
        processing_class: Any,
        scale: tuple[int, int] = (1, 100),
        template: JudgeTemplate | None = None,
        mode: str = "expected",
        style: str = "direct",
        pairwise_mode: str = "likelihood",
        tie_margin: float = 0.0,
        ppl_tolerance: float = 0.0,
        max_reason_tokens: int = 128,
        geval_top_k: int | None = None,
        softmax_temperature: float = 0.2,
        batch_size: int = 8,
        candidate_batch_size: int = 64,
        progress: bool = False,
    ):
        for name, value, allowed in [("mode", mode, MODES), ("style", style, STYLES),
                                     ("pairwise_mode", pairwise_mode, PAIRWISE_MODES)]:
            if value not in allowed:
                raise ValueError(f"TrustJudge: {name}={value!r}; expected one of {allowed}")
        low, high = scale
        if not (isinstance(low, int) and isinstance(high, int) and low < high and high - low < MAX_SCALE_SIZE):
            raise ValueError(f"TrustJudge: scale must be two integers low < high spanning < {MAX_SCALE_SIZE}, "
                             f"got {scale}")
        if batch_size < 1 or candidate_batch_size < 1 or max_reason_tokens < 1:
            raise ValueError("TrustJudge: batch_size, candidate_batch_size and max_reason_tokens must be ≥ 1")
        self.model, self.processing_class = model, processing_class
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.is_vlm = hasattr(processing_class, "image_processor")
        self.scale, self.template = (low, high), template or JudgeTemplate()
        self.mode, self.style, self.pairwise_mode = mode, style, pairwise_mode
        self.tie_margin, self.ppl_tolerance, self.max_reason_tokens = tie_margin, ppl_tolerance, max_reason_tokens
        self.geval_top_k, self.softmax_temperature = geval_top_k, softmax_temperature
        self.batch_size = 1 if self.is_vlm else batch_size
        self.candidate_batch_size, self.progress = candidate_batch_size, progress
        self._chat = getattr(self.tokenizer, "chat_template", None) is not None
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        t = self.template
        self.score_labels = list(range(low, high + 1))
        self.score_candidates = self._answer_ids(t.score_marker, [str(s) for s in self.score_labels])
        self.verdict_candidates = self._answer_ids(t.verdict_marker, list(t.verdict_labels))

    # ---------------------------------------------------------------- public API

    def score_probabilities(self, prompts: Sequence[Any], responses: Sequence[Any],
                            images: Sequence[Sequence | None] | None = None) -> list[dict[int, float]]:
        """Raw p(s) of every allowed score s of each (prompt, response): the judge's probability of the answer
        ``s<close>`` (the product of its teacher-forced token probabilities), NOT renormalised over the scale."""
        t = self.template
        instruction = t.pointwise_reason if self.style == "reason_then_score" else t.pointwise_direct
        prompts, responses, images = self._checked(prompts, responses, images)
        texts = [t.pointwise.format(question=conversation_text(p), response=conversation_text(r), low=self.scale[0],
                                    high=self.scale[1], instruction=instruction) for p, r in zip(prompts, responses)]
        return [reading.probs for reading in self._read(texts, images, t.score_marker, self.score_candidates,
                                                        self.score_labels)]

    def score_distribution(self, prompts: Sequence[Any], responses: Sequence[Any],
                           images: Sequence[Sequence | None] | None = None) -> list[dict[int, float]]:
        """P(s) = p(s) / Σ_{s′} p(s′) for every allowed score s of each (prompt, response), renormalised over the
        scale (TrustJudge's distribution)."""
        return [renormalised(probs) for probs in self.score_probabilities(prompts, responses, images)]

    def score(self, prompts: Sequence[Any], responses: Sequence[Any],
              images: Sequence[Sequence | None] | None = None) -> list[float]:
        """One score per (prompt, response) on the scale, by ``mode`` (default: the expected score)."""
        return [self.score_from_distribution(p) for p in self.score_probabilities(prompts, responses, images)]

    def score_from_distribution(self, probs: dict[int, float]) -> float:
        """Apply ``mode`` to the RAW p(s) of ``score_probabilities``: ``expected`` renormalises them itself,
        ``geval`` and ``softmax_weighted`` use them as they are (as the official code uses the API's raw
        probabilities), ``discrete`` takes the most probable score. Given an already renormalised distribution,
        ``geval`` would equal ``expected``."""
        if self.mode == "expected":
            return expected_score(probs)
        if self.mode == "geval":
            return geval_score(probs, self.geval_top_k)
        if self.mode == "softmax_weighted":
            return softmax_weighted_score(probs, self.softmax_temperature)
        return float(discrete_score(probs))

    def compare_pairs(self, prompts: Sequence[Any], responses_a: Sequence[Any], responses_b: Sequence[Any],
                      images: Sequence[Sequence | None] | None = None) -> list[Verdict]:
        """Judge every (prompt, A, B) in both orders and aggregate by ``pairwise_mode``."""
        if len(responses_a) != len(responses_b):
            raise ValueError(f"compare_pairs: {len(responses_a)} responses A but {len(responses_b)} responses B")
        prompts, responses_a, images = self._checked(prompts, responses_a, images)
        t = self.template
        instruction = t.pairwise_reason if self.style == "reason_then_score" else t.pairwise_direct
        texts = []
        for p, a, b in zip(prompts, responses_a, responses_b):
            question, a, b = conversation_text(p), conversation_text(a), conversation_text(b)
            texts += [t.pairwise.format(question=question, response_a=first, response_b=second,
                                        instruction=instruction) for first, second in ((a, b), (b, a))]
        readings = self._read(texts, [im for im in images for _ in range(2)], t.verdict_marker,
                              self.verdict_candidates, list(VERDICTS))
        return [self._verdict(readings[2 * i], readings[2 * i + 1]) for i in range(len(prompts))]

    def compare(self, prompt: Any, response_a: Any, response_b: Any, images: Sequence | None = None) -> Verdict:
        """Judge one pair (A, B) in both orders; see ``compare_pairs``."""
        return self.compare_pairs([prompt], [response_a], [response_b], None if images is None else [images])[0]

    # ---------------------------------------------------------------- internals

    def _checked(self, prompts: Sequence, responses: Sequence, images: Sequence | None) -> tuple[list, list, list]:
        """Lists of equal length, with the images of each item (explicit ones plus those inside the prompt)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        merged = [list(images[i] or []) if images is not None else [] for i in range(len(prompts))]
        merged = [explicit + embedded_images(p) for explicit, p in zip(merged, prompts)]
        if any(merged) and not self.is_vlm:
            raise ValueError("images were given but the judge's processing class has no image processor; "
                             "load a VLM judge (e.g. a Qwen2-VL checkpoint) with its processor")
        return list(prompts), list(responses), merged

    def _answer_ids(self, marker: str, labels: list[str]) -> list[list[int]]:
        """Token ids of each answer ``LABEL<close>`` as the tokenizer splits it after ``<marker> <open>``."""
        t = self.template
        prefix = f"{marker} {t.open}"
        prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"]
        answers = []
        for label in labels:
            ids = self.tokenizer(prefix + label + t.close, add_special_tokens=False)["input_ids"]
            if ids[: len(prefix_ids)] != prefix_ids or len(ids) == len(prefix_ids):
                raise ValueError(f"the tokenizer merges the answer {label + t.close!r} into {prefix!r}; change the "
                                 "template's open/close delimiters")
            answers.append(ids[len(prefix_ids):])
        if len({tuple(a) for a in answers}) != len(answers):
            raise ValueError(f"two answers after {prefix!r} tokenise identically; labels must be distinguishable")
        return answers

    def _render(self, text: str, n_images: int) -> str:
        """The judge conversation (one user turn) rendered up to the start of the assistant's reply."""
        if not self._chat:
            return text + "\n"
        content: Any = text
        if self.is_vlm:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
        return self.processing_class.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                         add_generation_prompt=True)

    def _encode(self, texts: list[str], images: list[list]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for rendered contexts (with pixel values for a VLM's images)."""
        kwargs = dict(padding=True, padding_side="left", return_tensors="pt", add_special_tokens=not self._chat)
        if self.is_vlm:
            inputs = self.processing_class(text=texts, images=images if any(images) else None, **kwargs)
        else:
            inputs = self.tokenizer(texts, **kwargs)
        return {k: v.to(self.model.device) for k, v in inputs.items()}

    def _read(self, texts: list[str], images: list[list], marker: str, candidates: list[list[int]],
              labels: list) -> list[_Reading]:
        """For each judge prompt: p(label) of every answer at the answer position, plus the output's log-prob."""
        readings: list[_Reading] = []
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for start in tqdm(range(0, len(texts), self.batch_size), desc="Judging", unit="batch",
                                  disable=not self.progress):
                    batch_images = images[start : start + self.batch_size]
                    rendered = [self._render(text, len(im))
                                for text, im in zip(texts[start : start + self.batch_size], batch_images)]
                    if self.style == "reason_then_score":
                        contexts, out_logps, out_lens = self._reason(rendered, batch_images, marker)
                    else:
                        contexts = [r + f"{marker} {self.template.open}" for r in rendered]
                        out_logps, out_lens = [0.0] * len(rendered), [0] * len(rendered)
                    logps = self.candidate_logprobs(self._encode(contexts, batch_images), candidates)
                    for row, (out_logp, out_len) in enumerate(zip(out_logps, out_lens)):
                        top = int(logps[row].argmax())
                        readings.append(_Reading(
                            probs={label: float(lp) for label, lp in zip(labels, logps[row].exp())},
                            output_logprob=out_logp + float(logps[row, top]),
                            output_tokens=out_len + len(candidates[top]),
                        ))
        finally:
            self.model.train(was_training)
        return readings

    def _reason(self, rendered: list[str], images: list[list], marker: str) -> tuple[list[str], list[float], list[int]]:
        """Greedy rationales (cut at ``marker``), the contexts ending in ``<marker> <open>``, and their log-probs."""
        inputs = self._encode(rendered, images)
        width = inputs["input_ids"].shape[1]
        out = self.model.generate(**inputs, max_new_tokens=self.max_reason_tokens, do_sample=False,
                                  stop_strings=[marker], tokenizer=self.tokenizer, pad_token_id=self.pad_id,
                                  output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        logps = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        stop = torch.isin(new, torch.tensor([self.pad_id, self.tokenizer.eos_token_id], device=new.device))
        valid = (stop.cumsum(-1) == 0).to(logps.dtype)  # tokens before the first EOS / padding
        contexts = []
        for row, text in enumerate(self.tokenizer.batch_decode(new, skip_special_tokens=True)):
            cut = text.find(marker)
            rationale = text[:cut].rstrip() if cut >= 0 else text.rstrip()
            contexts.append(f"{rendered[row]}{rationale}\n{marker} {self.template.open}")
        return contexts, (logps * valid).sum(-1).tolist(), valid.sum(-1).long().tolist()

    def candidate_logprobs(self, inputs: dict[str, torch.Tensor], candidates: list[list[int]]) -> torch.Tensor:
        """log P(candidate | context) for every left-padded context row and candidate token list: [B, C] float64.

        One forward over the contexts keeps their KV cache. The candidates' tokens (all but each one's last, which
        is only read) form a prefix tree; text contexts then run the whole tree as ONE extra sequence per context
        on that cache, each tree token attending to the context and its own ancestors (a 4D mask, positions by
        depth). Contexts with images (batch of 1; VLMs place image positions themselves) run the tree's
        root-to-leaf paths as a batch of rows on copies of the cache, ``candidate_batch_size`` rows at a time.
        """
        mask = inputs["attention_mask"]
        has_images = any(k in inputs for k in ("pixel_values", "pixel_values_videos"))
        if has_images and mask.shape[0] != 1:
            raise ValueError("candidate_logprobs: contexts with images are scored one at a time (batch of 1)")
        positions = {} if has_images else {"position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0)}
        out = self.model(**inputs, **positions, use_cache=True, logits_to_keep=1)
        result = out.logits[:, -1].double().log_softmax(-1)[:, [c[0] for c in candidates]]
        tokens, parents, depths, reads = _prefix_tree(candidates)
        if not tokens:
            return result
        device, n = mask.device, len(tokens)
        node, token, cand = torch.tensor(reads, device=device).reshape(-1, 3).unbind(-1)
        if not has_images:
            ancestors = torch.eye(n, dtype=torch.bool, device=device)
            for i, parent in enumerate(parents):
                if parent >= 0:
                    ancestors[i] |= ancestors[parent]
            allowed = torch.cat([mask.bool()[:, None, None, :].expand(-1, 1, n, -1),
                                 ancestors.expand(mask.shape[0], 1, n, n)], -1)
            dtype = self.model.dtype
            tree_mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
            tree_positions = mask.long().sum(-1, keepdim=True) - 1 + torch.tensor(depths, device=device)
            logits = self.model(input_ids=torch.tensor(tokens, device=device).expand(mask.shape[0], n),
                                attention_mask=tree_mask, position_ids=tree_positions, cache=out.cache,
                                use_cache=True).logits
            return result.index_add_(1, cand, logits.float().log_softmax(-1)[:, node, token].double())
        leaves = [i for i in range(n) if i not in set(parents)]
        paths = []
        for leaf in leaves:
            path = [leaf]
            while parents[path[0]] >= 0:
                path.insert(0, parents[path[0]])
            paths.append(path)
        row_of = {i: r for r, path in enumerate(paths) for i in path}
        width = max(len(path) for path in paths)
        row_ids = torch.tensor([[tokens[i] for i in path] + [self.pad_id] * (width - len(path)) for path in paths],
                               device=device)
        row = torch.tensor([row_of[i] for i in range(n)], device=device)[node]
        col = torch.tensor(depths, device=device)[node] - 1
        for chunk in torch.arange(len(paths), device=device).split(self.candidate_batch_size):
            cache = copy.deepcopy(out.cache)
            cache.batch_repeat_interleave(len(chunk))
            logp = self.model(input_ids=row_ids[chunk], cache=cache, use_cache=True).logits.float().log_softmax(-1)
            picked = (row >= chunk[0]) & (row <= chunk[-1])
            result[0].index_add_(0, cand[picked], logp[row[picked] - chunk[0], col[picked], token[picked]].double())
        return result

    def _verdict(self, order1: _Reading, order2: _Reading) -> Verdict:
        """Aggregate the two orders' readings by ``pairwise_mode``."""
        p1, p2 = renormalised(order1.probs), renormalised(order2.probs)
        likelihood, merged = merge_pairwise(p1, p2, self.tie_margin)
        ppl1 = perplexity(order1.output_logprob, order1.output_tokens)
        ppl2 = perplexity(order2.output_logprob, order2.output_tokens)
        if self.pairwise_mode == "likelihood":
            verdict = likelihood
        elif self.pairwise_mode == "ppl":
            verdict = ppl_verdict(p1, ppl1, p2, ppl2, self.ppl_tolerance)
        else:
            verdict = baseline_verdict(p1, p2)
        return Verdict(verdict, merged, p1, p2, ppl1, ppl2)


def _prefix_tree(candidates: list[list[int]]) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """Prefix tree of the candidates' input tokens (each candidate minus its last token).

    Returns per node its token, parent node (−1: the context) and depth (1 = first answer token), and the reads:
    (node, next token, candidate) for every candidate token after the first — read from the logits at that node.
    """
    index: dict[tuple[int, ...], int] = {}
    tokens, parents, depths = [], [], []
    for c in candidates:
        for k in range(1, len(c)):
            prefix = tuple(c[:k])
            if prefix not in index:
                index[prefix] = len(tokens)
                tokens.append(c[k - 1])
                parents.append(index.get(prefix[:-1], -1))
                depths.append(k)
    reads = [(index[tuple(c[:j])], c[j], ci) for ci, c in enumerate(candidates) for j in range(1, len(c))]
    return tokens, parents, depths, reads
