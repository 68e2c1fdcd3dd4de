"""TrustJudge (arXiv:2509.21117) against hand-computed values and naive one-forward-per-answer computations."""

import itertools
import json
import math

import pytest
import torch
from datasets import Dataset
from PIL import Image

from prefalign.judges import (
    ConsistencyReport,
    JudgeReward,
    JudgeTemplate,
    TrustJudge,
    Verdict,
    baseline_verdict,
    discrete_score,
    expected_score,
    geval_score,
    judge_consistency,
    merge_pairwise,
    pair_action,
    ppl_verdict,
    relabel_pairs,
    score_comparison_counts,
    softmax_weighted_score,
    transitivity_counts,
    triple_inconsistency,
)
from prefalign.judges.cli import main as judge_cli
from prefalign.losses import pairwise_reward
from prefalign.models import load_model, load_processing_class

PROMPTS = ["What does the word 'dog' mean?", "Hi", "What does the word 'eminence grise' mean? Answer briefly."]
RESPONSES = ["A domesticated carnivorous mammal.", "Hello there, how can I help?", "A powerful adviser."]


@pytest.fixture(scope="module")
def tiny():
    """The tiny random LM with noise added so its distributions are far from uniform, and its tokenizer."""
    model = load_model("tiny-causal-lm")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return model.eval(), load_processing_class("tiny-causal-lm")


def _naive_logprob(model, context_ids: list[int], answer_ids: list[int], **extra) -> float:
    """log P(answer | context) from ONE full forward of context + answer, float64 softmax (no cache, no batching)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context_ids + answer_ids]), **extra).logits[0].double()
    logp = logits.log_softmax(-1)
    return sum(logp[len(context_ids) - 1 + k, t].item() for k, t in enumerate(answer_ids))


def _context_ids(judge, text: str, marker: str) -> list[int]:
    """Token ids of the rendered judge prompt followed by '<marker> [['."""
    return judge.tokenizer(judge._render(text, 0) + f"{marker} [[", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ pure arithmetic


def test_score_functions_on_hand_written_distributions():
    """p = {1: .1, 2: .2, 3: .2}: renormalised {.2, .4, .4}; expected 2.2; G-Eval 1.1 (top-2: 1.0)."""
    probs = {1: 0.1, 2: 0.2, 3: 0.2}
    assert expected_score(probs) == pytest.approx(0.2 * 1 + 0.4 * 2 + 0.4 * 3, abs=1e-12)
    assert geval_score(probs) == pytest.approx(1 * 0.1 + 2 * 0.2 + 3 * 0.2, abs=1e-12)
    assert geval_score(probs, top_k=2) == pytest.approx(2 * 0.2 + 3 * 0.2, abs=1e-12)
    # softmax(log-odds / T) = odds^(1/T) normalised: odds 1/9, 1/4, 1/4 with T = 0.2
    w = {1: (1 / 9) ** 5, 2: (1 / 4) ** 5, 3: (1 / 4) ** 5}
    assert softmax_weighted_score(probs) == pytest.approx(sum(s * v for s, v in w.items()) / sum(w.values()), rel=1e-6)
    assert discrete_score({1: 0.3, 2: 0.3, 3: 0.1}) == 1  # tie → lower score
    assert discrete_score({1: 0.1, 5: 0.6, 3: 0.3}) == 5
    assert softmax_weighted_score({4: 1.0, 5: 0.0}) == 4.0  # p ∈ {0, 1} skipped: falls back to the top-1
    for bad in ({}, {1: 0.0, 2: 0.0}, {1: -0.1, 2: 0.5}, {1: float("nan")}):
        with pytest.raises(ValueError):
            expected_score(bad)


def test_merge_pairwise_by_hand_symmetry_ties_and_determinism():
    """m = P1 + swap(P2); swapping A and B swaps the verdict; exact ties → tie; the result never depends on order."""
    p1 = {"first": 0.5, "second": 0.3, "tie": 0.2}
    p2 = {"first": 0.4, "second": 0.4, "tie": 0.2}
    verdict, merged = merge_pairwise(p1, p2)
    assert verdict == "first" and merged == pytest.approx({"first": 0.9, "second": 0.7, "tie": 0.4})
    # (B, A): its order 1 is our order 2 and vice versa
    swapped, swapped_merged = merge_pairwise(p2, p1)
    assert swapped == "second" and swapped_merged == pytest.approx({"first": 0.7, "second": 0.9, "tie": 0.4})
    # unnormalised inputs are renormalised per order
    assert merge_pairwise({k: 3 * v for k, v in p1.items()}, p2)[1] == pytest.approx(merged)
    # exact tie of first and second: "tie", in both orders, every time, whatever the dict order
    tied = {"first": 0.4, "second": 0.4, "tie": 0.2}
    for order in itertools.permutations(tied):
        reordered = {k: tied[k] for k in order}
        assert merge_pairwise(reordered, reordered)[0] == "tie"
    assert merge_pairwise(p1, p2, tie_margin=0.11)[0] == "tie"  # (0.9 − 0.7)/2 = 0.1 ≤ margin
    assert merge_pairwise(p1, p2, tie_margin=0.09)[0] == "first"
    with pytest.raises(ValueError):
        merge_pairwise({"first": 1.0, "second": 0.0}, p2)


def test_ppl_and_baseline_verdicts_by_hand():
    """ppl: the lower-perplexity order's top-1 (order 2 swapped back); baseline: agreement or tie."""
    a_wins = {"first": 0.6, "second": 0.3, "tie": 0.1}
    b_wins_in_order2 = {"first": 0.2, "second": 0.7, "tie": 0.1}  # order 2 shows (B, A): "second" = A better
    assert ppl_verdict(a_wins, 1.5, b_wins_in_order2, 2.0) == "first"
    assert ppl_verdict({"first": 0.1, "second": 0.8, "tie": 0.1}, 3.0, {"first": 0.1, "second": 0.2, "tie": 0.7},
                       2.0) == "tie"
    assert ppl_verdict(a_wins, 2.0, {"first": 0.9, "second": 0.05, "tie": 0.05}, 1.2) == "second"
    assert ppl_verdict(a_wins, 2.0, b_wins_in_order2, 2.05, tolerance=0.1) == "tie"
    assert baseline_verdict(a_wins, b_wins_in_order2) == "first"
    assert baseline_verdict(a_wins, a_wins) == "tie"  # order 1 says A, order 2 says B: position bias → tie


# ------------------------------------------------------------------ consistency metrics

# The official NonTransitivityCalculator's table: (r(i,j), r(j,k), r(i,k)) → inconsistency type (None: consistent)
OFFICIAL_TRIPLES = {
    (">", ">", ">"): None, (">", ">", "="): "equivalence", (">", ">", "<"): "cycle", (">", "=", ">"): None,
    (">", "=", "="): "equivalence", (">", "=", "<"): "cycle", (">", "<", ">"): None, (">", "<", "="): None,
    (">", "<", "<"): None, ("=", ">", ">"): None, ("=", ">", "="): "equivalence", ("=", ">", "<"): "cycle",
    ("=", "=", ">"): "equivalence", ("=", "=", "="): None, ("=", "=", "<"): "equivalence", ("=", "<", ">"): "cycle",
    ("=", "<", "="): "equivalence", ("=", "<", "<"): None, ("<", ">", ">"): None, ("<", ">", "="): None,
    ("<", ">", "<"): None, ("<", "=", ">"): "cycle", ("<", "=", "="): "equivalence", ("<", "=", "<"): None,
    ("<", "<", ">"): "cycle", ("<", "<", "="): "equivalence", ("<", "<", "<"): None,
}


def test_triple_classification_matches_the_official_table():
    for relations, kind in OFFICIAL_TRIPLES.items():
        assert triple_inconsistency(*relations) == kind, relations


def test_consistency_counts_on_hand_built_verdict_tables():
    """0 ≻ 1 ≻ 2 ≻ 0 with 3 below all: 4 triples, 1 cycle; 0 = 1 = 2 but 0 ≻ 2: 1 equivalence contradiction."""
    cyclic = {(0, 1): "first", (1, 2): "first", (0, 2): "second", (0, 3): "first", (1, 3): "first", (2, 3): "first"}
    assert transitivity_counts(cyclic, 4) == (4, 1, 0)
    two_cycles = {(0, 1): "first", (1, 2): "first", (0, 2): "second", (0, 3): "second", (1, 3): "first",
                  (2, 3): "first"}  # adds 3 ≻ 0 ≻ 1 ≻ 3: (0, 1, 3) cycles too; (0,2,3): 2≻0, 3≻0, 2≻3 fine
    assert transitivity_counts(two_cycles, 4) == (4, 2, 0)
    equivalence = {(0, 1): "tie", (1, 2): "tie", (0, 2): "first"}
    assert transitivity_counts(equivalence, 3) == (1, 0, 1)
    # keys in either order: (2, 0) "first" means 2 ≻ 0
    assert transitivity_counts({(0, 1): "first", (1, 2): "first", (2, 0): "first"}, 3) == (1, 1, 0)
    # scores 3 > 2 > 2: (0, 2) prefers the LOWER score (a score-comparison inconsistency, and a disagreement);
    # (1, 2) expects a tie but is strict (only a disagreement: neither response has the lower score)
    scores = [3.0, 2.0, 2.0]
    verdicts = {(0, 1): "first", (0, 2): "second", (1, 2): "first"}
    counts = score_comparison_counts(scores, verdicts)
    assert (counts.pairs, counts.inconsistencies, counts.disagreements) == (3, 1, 2)
    # a tie verdict on a large gap is a disagreement, not an inconsistency; gaps below the tolerance expect a tie
    assert score_comparison_counts([3.0, 1.0], {(0, 1): "tie"}) == (1, 0, 1)
    assert score_comparison_counts([3.0, 2.5, 1.0], {(0, 1): "tie", (0, 2): "first", (1, 2): "first"},
                                   tolerance=1.0) == (3, 0, 0)
    report = ConsistencyReport()
    report.add(scores, verdicts)
    report.add([1.0, 2.0, 3.0, 4.0], {pair: "second" for pair in itertools.combinations(range(4), 2)})
    assert (report.pairs, report.score_comparison_inconsistencies, report.verdict_score_disagreements,
            report.triples, report.cycles) == (9, 1, 2, 5, 1)
    assert report.score_comparison_inconsistency == pytest.approx(1 / 9)  # the spec's: verdict prefers the lower
    assert report.verdict_score_disagreement_rate == pytest.approx(2 / 9)  # the official ConflictCalculator's
    assert report.transitivity_inconsistency == pytest.approx(1 / 5)
    assert report.summary() == {
        "pairs": 9, "score_comparison_inconsistencies": 1, "score_comparison_inconsistency": pytest.approx(1 / 9),
        "verdict_score_disagreements": 2, "verdict_score_disagreement_rate": pytest.approx(2 / 9), "triples": 5,
        "cycles": 1, "equivalence_contradictions": 0, "transitivity_inconsistency": pytest.approx(1 / 5)}


# ------------------------------------------------------------------ the judge on tiny models


def test_tiny_tokenizer_splits_numbers_into_digits(tiny):
    tokenizer = tiny[1]
    assert tokenizer.convert_ids_to_tokens(tokenizer("85", add_special_tokens=False)["input_ids"]) == ["8", "5"]


def test_multi_token_score_includes_every_digit_and_the_delimiter(tiny):
    """P("85") = p(8)·p(5|8)·p(]]|85) and P("8") = p(8)·p(]]|8), by naive forwards; P sums to 1 over 1..100."""
    model, tokenizer = tiny
    judge = TrustJudge(model, tokenizer)
    text = judge.template.pointwise.format(question=PROMPTS[0], response=RESPONSES[0], low=1, high=100,
                                           instruction=judge.template.pointwise_direct)
    context = _context_ids(judge, text, "Rating:")
    digit = {d: tokenizer.convert_tokens_to_ids(d) for d in "0123456789"}
    close = tokenizer("]]", add_special_tokens=False)["input_ids"]
    p85 = math.exp(_naive_logprob(model, context, [digit["8"], digit["5"], *close]))
    p8 = math.exp(_naive_logprob(model, context, [digit["8"], *close]))
    first8 = math.exp(_naive_logprob(model, context, [digit["8"]]))
    assert p8 < first8 and p85 < first8  # neither is just the first token's probability
    dist = judge.score_distribution([PROMPTS[0]], [RESPONSES[0]])[0]
    assert sorted(dist) == list(range(1, 101)) and sum(dist.values()) == pytest.approx(1.0, abs=1e-12)
    raw = judge.candidate_logprobs(judge._encode([tokenizer.decode(context)], [[]]), judge.score_candidates)[0].exp()
    assert raw[85 - 1].item() == pytest.approx(p85, rel=1e-5)
    assert raw[8 - 1].item() == pytest.approx(p8, rel=1e-5)
    assert dist[85] / dist[8] == pytest.approx(p85 / p8, rel=1e-5)


@pytest.mark.parametrize("scale", [(1, 100), (1, 5)])
def test_batched_kv_path_equals_one_forward_per_answer(tiny, scale):
    """Left-padded batches of contexts + the prefix-tree pass = a full forward per (context, answer)."""
    model, tokenizer = tiny
    judge = TrustJudge(model, tokenizer, scale=scale, batch_size=2)  # 3 items: a padded batch of 2, then 1
    dists = judge.score_distribution(PROMPTS, RESPONSES)
    for prompt, response, dist in zip(PROMPTS, RESPONSES, dists):
        text = judge.template.pointwise.format(question=prompt, response=response, low=scale[0], high=scale[1],
                                               instruction=judge.template.pointwise_direct)
        context = _context_ids(judge, text, "Rating:")
        naive = torch.tensor([_naive_logprob(model, context, ids) for ids in judge.score_candidates],
                             dtype=torch.float64).exp()
        naive = naive / naive.sum()
        torch.testing.assert_close(torch.tensor([dist[s] for s in range(scale[0], scale[1] + 1)], dtype=torch.float64), naive,
                                   rtol=1e-5, atol=1e-7)


def _hand_context(tokenizer, text: str, marker: str) -> list[int]:
    """The judge conversation rendered with the tokenizer's own chat template, then '<marker> [[' (no judge code)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(rendered + f"{marker} [[", add_special_tokens=False)["input_ids"]


def _hand_answer(tokenizer, label: str) -> list[int]:
    """Token ids of 'LABEL]]' built character by character (the tiny tokenizer splits digits and brackets)."""
    return [tokenizer.convert_tokens_to_ids(c) for c in label + "]]"]


def _hand_raw_probs(model, context: list[int], answers: dict) -> dict:
    """Raw p(answer) = product of the teacher-forced token probabilities, float64 softmax of ONE full forward each."""
    return {label: math.exp(_naive_logprob(model, context, ids)) for label, ids in answers.items()}


@pytest.fixture(scope="module")
def scorer():
    """The tiny LM with the rows of the digits and ']' (tied embeddings) moved along its mean final hidden state at a
    judge prompt, so that the scale gets a raw mass of ~1e-2 (not ~1e-9): the modes then differ far beyond ε."""
    model, tokenizer = load_model("tiny-causal-lm").eval(), load_processing_class("tiny-causal-lm")
    text = JudgeTemplate().pointwise.format(question="Hi", response="Hello", low=1, high=12,
                                            instruction=JudgeTemplate().pointwise_direct)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([_hand_context(tokenizer, text, "Rating:")]),
                       output_hidden_states=True).hidden_states[-1][0].mean(0)
        model.lm_head.weight[[tokenizer.convert_tokens_to_ids(c) for c in "0123456789]"]] += 2 * hidden / hidden.norm()
    return model, tokenizer


@pytest.mark.parametrize("name", ["expected", "geval", "geval_top3", "softmax_weighted", "discrete"])
def test_every_mode_reads_the_raw_probabilities_of_a_real_forward(scorer, name):
    """Scale 1..12 (1..9: digit + ']' + ']', 10..12: four tokens), raw p(s) from plain forwards, every mode by hand.

    expected: Σ s·p(s)/Σ p; geval: Σ s·p(s) (not renormalised), top-3: the 3 largest p(s) only; softmax_weighted:
    w ∝ exp(l/0.2), l = log((p+ε)/(1−p+ε)) from the RAW p; discrete: argmax p.
    """
    model, tokenizer = scorer
    scale = range(1, 13)
    texts = [JudgeTemplate().pointwise.format(question=q, response=r, low=1, high=12,
                                              instruction=JudgeTemplate().pointwise_direct)
             for q, r in zip(PROMPTS, RESPONSES)]
    answers = {s: _hand_answer(tokenizer, str(s)) for s in scale}
    assert [len(answers[s]) for s in (9, 10)] == [3, 4]
    hand = []
    for text in texts:
        p = _hand_raw_probs(model, _hand_context(tokenizer, text, "Rating:"), answers)
        total = math.fsum(p.values())
        assert 1e-4 < total < 0.5  # far from 1 (renormalising changes geval) and far above ε = 1e-8
        top3 = sorted(p, key=p.get, reverse=True)[:3]
        odds = {s: ((v + 1e-8) / (1 - v + 1e-8)) ** 5 for s, v in p.items()}  # exp(l / 0.2)
        hand.append({
            "expected": math.fsum(s * v for s, v in p.items()) / total,
            "geval": math.fsum(s * v for s, v in p.items()),
            "geval_top3": math.fsum(s * p[s] for s in top3),
            "softmax_weighted": math.fsum(s * w for s, w in odds.items()) / math.fsum(odds.values()),
            "discrete": float(max(p, key=p.get)),
        })
    judge = TrustJudge(model, tokenizer, scale=(1, 12), mode=name.removesuffix("_top3"), batch_size=2,
                       geval_top_k=3 if name == "geval_top3" else None)
    assert judge.score(PROMPTS, RESPONSES) == pytest.approx([h[name] for h in hand], rel=1e-5, abs=0)

def test_reason_then_score_reads_the_score_after_a_greedy_rationale(tiny):
    """The rationale is the model's greedy continuation; the score distribution is read after it."""
    model, tokenizer = tiny
    judge = TrustJudge(model, tokenizer, scale=(1, 5), style="reason_then_score", max_reason_tokens=6)
    dist = judge.score_distribution([PROMPTS[0]], [RESPONSES[0]])[0]
    text = judge.template.pointwise.format(question=PROMPTS[0], response=RESPONSES[0], low=1, high=5,
                                           instruction=judge.template.pointwise_reason)
    rendered = judge._render(text, 0)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    generated = []
    with torch.no_grad():  # greedy by hand, one full forward per token
        for _ in range(6):
            generated.append(int(model(input_ids=torch.tensor([ids + generated])).logits[0, -1].argmax()))
    rationale = tokenizer.decode(generated, skip_special_tokens=True)
    assert "Rating:" not in rationale  # random weights: the marker never appears, so nothing is cut
    context = tokenizer(rendered + rationale.rstrip() + "\nRating: [[", add_special_tokens=False)["input_ids"]
    naive = torch.tensor([_naive_logprob(model, context, c) for c in judge.score_candidates],
                         dtype=torch.float64).exp()
    torch.testing.assert_close(torch.tensor([dist[s] for s in range(1, 6)], dtype=torch.float64), naive / naive.sum(),
                               rtol=1e-5, atol=1e-7)


def test_vlm_judge_with_an_image_equals_naive_forwards():
    """tiny-qwen2-vl with an image in the prompt: KV-reusing rows = a full forward (image included) per answer."""
    model, processor = load_model("tiny-qwen2-vl").eval(), load_processing_class("tiny-qwen2-vl")
    judge = TrustJudge(model, processor, scale=(1, 20))
    image = Image.new("RGB", (60, 60), (200, 30, 30))
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    dist = judge.score_distribution([prompt], ["Red."])[0]
    text = judge.template.pointwise.format(question="Colour?", response="Red.", low=1, high=20,
                                           instruction=judge.template.pointwise_direct)
    context = judge._render(text, 1) + "Rating: [["
    naive = []
    for answer in judge.score_candidates:
        inputs = processor(text=[context], images=[[image]], return_tensors="pt", add_special_tokens=False)
        ids = inputs.pop("input_ids")[0].tolist()
        inputs["attention_mask"] = torch.ones(1, len(ids) + len(answer), dtype=torch.long)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(answer),
                                                                                          dtype=torch.long)], 1)
        naive.append(_naive_logprob(model, ids, answer, **inputs))
    naive = torch.tensor(naive, dtype=torch.float64).exp()
    torch.testing.assert_close(torch.tensor([dist[s] for s in range(1, 21)], dtype=torch.float64), naive / naive.sum(),
                               rtol=1e-5, atol=1e-7)


def _hand_verdict_probs(model, tokenizer, question: str, first: str, second: str) -> dict[str, float]:
    """P(first/second/tie better) judging (first, second): raw p of 'A]]', 'B]]', 'C]]' from plain forwards,
    renormalised over the three verdicts."""
    template = JudgeTemplate()
    text = template.pairwise.format(question=question, response_a=first, response_b=second,
                                    instruction=template.pairwise_direct)
    context = _hand_context(tokenizer, text, "Verdict:")
    raw = _hand_raw_probs(model, context, {k: _hand_answer(tokenizer, label) for k, label in
                                           zip(("first", "second", "tie"), "ABC")})
    return {k: v / math.fsum(raw.values()) for k, v in raw.items()}


def test_compare_by_hand_and_symmetric_under_swapping_the_responses(tiny):
    """compare(q, A, B) for every pairwise mode against plain forwards: each order's verdict distribution, the merge
    m[k] = P1(k) + P2(swap k), the perplexities and each mode's verdict by hand (this pair gets three different
    verdicts); compare(q, B, A) swaps verdicts and merged values."""
    model, tokenizer = tiny
    question, a, b = PROMPTS[2], RESPONSES[0], RESPONSES[2]
    swap = {"first": "second", "second": "first", "tie": "tie"}
    label = {"first": "A", "second": "B", "tie": "C"}
    template = JudgeTemplate()
    p1 = _hand_verdict_probs(model, tokenizer, question, a, b)
    p2 = _hand_verdict_probs(model, tokenizer, question, b, a)
    merged = {k: p1[k] + p2[swap[k]] for k in p1}
    top1, top2 = max(p1, key=p1.get), max(p2, key=p2.get)
    ppl = []  # each order's output is its top verdict's answer (3 tokens): perplexity exp(−log p / 3)
    for first, second, top in ((a, b, top1), (b, a, top2)):
        text = template.pairwise.format(question=question, response_a=first, response_b=second,
                                        instruction=template.pairwise_direct)
        raw = _hand_raw_probs(model, _hand_context(tokenizer, text, "Verdict:"), {0: _hand_answer(tokenizer, label[top])})
        ppl.append(raw[0] ** (-1 / 3))
    expected = {"likelihood": max(merged, key=merged.get),
                "ppl": top1 if ppl[0] < ppl[1] else swap[top2],  # the lower-perplexity order decides
                "baseline": top1 if top1 == swap[top2] else "tie"}
    assert sorted(merged.values())[-1] - sorted(merged.values())[-2] > 1e-2  # the argmax is well defined
    assert sorted(expected.values()) == ["first", "second", "tie"]  # the three modes really differ here
    for mode in ("likelihood", "ppl", "baseline"):
        judge = TrustJudge(model, tokenizer, pairwise_mode=mode)
        ab, ba = judge.compare_pairs([question] * 2, [a, b], [b, a])
        assert ab.probs_order1 == pytest.approx(p1, rel=1e-5) and ab.probs_order2 == pytest.approx(p2, rel=1e-5)
        assert ab.merged == pytest.approx(merged, rel=1e-5)
        assert [ab.ppl_order1, ab.ppl_order2] == pytest.approx(ppl, rel=1e-5)
        assert ab.verdict == expected[mode], mode
        assert ba.verdict == swap[ab.verdict]
        assert ba.merged == pytest.approx({k: ab.merged[swap[k]] for k in ab.merged}, abs=1e-6)
        assert ba.margin == pytest.approx(-ab.margin, abs=1e-6)


def test_reward_adapter_by_hand_from_real_forwards(tiny):
    """Called as GRPOTrainer calls it (keywords, conversational, extra columns). Pointwise: (S − 1)/9 with S the
    expected score of plain forwards; pairwise: ½[P(y ≻ y* | (y, y*)) + 1 − P(y* ≻ y | (y*, y))] with each P the
    "first better" probability over all three verdicts (tie mass included) of plain forwards."""
    model, tokenizer = tiny
    judge = TrustJudge(model, tokenizer, scale=(1, 10))
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
    completions = [[{"role": "assistant", "content": r}] for r in RESPONSES]
    reward = JudgeReward(judge)
    got = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 3, trainer_state=None,
                 log_extra=lambda *a: None, log_metric=lambda *a: None, word=["dog", "hi", "eg"])
    answers = {s: _hand_answer(tokenizer, str(s)) for s in range(1, 11)}
    expected = []
    for q, r in zip(PROMPTS, RESPONSES):
        text = JudgeTemplate().pointwise.format(question=q, response=r, low=1, high=10,
                                                instruction=JudgeTemplate().pointwise_direct)
        p = _hand_raw_probs(model, _hand_context(tokenizer, text, "Rating:"), answers)
        expected.append((math.fsum(s * v for s, v in p.items()) / math.fsum(p.values()) - 1) / 9)
    assert got == pytest.approx(expected, rel=1e-5)
    assert reward.__name__ == "trust_judge"
    anchors = list(reversed(RESPONSES))
    got = JudgeReward(judge, anchor_column="reference")(prompts=prompts, completions=completions, reference=anchors)
    expected, tie_mass = [], []
    for q, y, anchor in zip(PROMPTS, RESPONSES, anchors):
        forward = _hand_verdict_probs(model, tokenizer, q, y, anchor)
        backward = _hand_verdict_probs(model, tokenizer, q, anchor, y)
        expected.append(0.5 * (forward["first"] + 1 - backward["first"]))
        tie_mass.append(backward["tie"])
    assert got == pytest.approx(expected, rel=1e-5)
    assert max(tie_mass) > 0.5  # row 0: the judge puts most mass on "tie", so its treatment is tested
    assert got[1] == pytest.approx(0.5, abs=1e-6)  # row 1 is its own anchor: exactly ½ (a position-consistent tie)


def test_pairwise_reward_with_tie_mass_from_fixed_verdict_distributions():
    """r = ½[P1(first) + 1 − P2(first)], P over first/second/tie: tie mass lowers both P; a certain tie gives ½."""
    cases = [  # (P judging (y, y*), P judging (y*, y), r by hand)
        ({"first": 0.5, "second": 0.2, "tie": 0.3}, {"first": 0.1, "second": 0.6, "tie": 0.3}, 0.5 * (0.5 + 1 - 0.1)),
        ({"first": 0.0, "second": 0.0, "tie": 1.0}, {"first": 0.0, "second": 0.0, "tie": 1.0}, 0.5),
        ({"first": 0.6, "second": 0.4, "tie": 0.0}, {"first": 0.2, "second": 0.2, "tie": 0.6}, 0.5 * (0.6 + 1 - 0.2)),
        ({"first": 0.8, "second": 0.2, "tie": 0.0}, {"first": 0.3, "second": 0.7, "tie": 0.0}, 0.75),
        ({"first": 1.0, "second": 0.0, "tie": 0.0}, {"first": 0.0, "second": 1.0, "tie": 0.0}, 1.0),
    ]
    verdicts = [Verdict("first", merge_pairwise(p1, p2)[1], p1, p2, 1.0, 1.0) for p1, p2, _ in cases]
    reward = JudgeReward(_FixedJudge(verdicts), anchor_column="anchor")
    got = reward(prompts=["q"] * len(cases), completions=["y"] * len(cases), anchor=["a"] * len(cases))
    assert got == pytest.approx([r for _, _, r in cases], abs=1e-12)
    # Without tie mass it is Pairwise-RL's two-verdict reward: sigmoid(log .8 − log .2) = .8, sigmoid(log .3 − log .7)
    two_verdict = pairwise_reward(torch.tensor([[math.log(0.8), math.log(0.2)]], dtype=torch.float64),
                                  torch.tensor([[math.log(0.3), math.log(0.7)]], dtype=torch.float64))
    assert got[3] == pytest.approx(two_verdict.item(), abs=1e-12)

class _FixedJudge:
    """Stands in for a judge whose verdicts are known, to test the keep/flip/drop bookkeeping alone."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def compare_pairs(self, prompts, a, b, images=None):
        return self.verdicts[: len(prompts)]


def _verdict(first, second, tie):
    merged = {"first": first, "second": second, "tie": tie}
    probs = {k: v / 2 for k, v in merged.items()}
    verdict = merge_pairwise(probs, {"first": second / 2, "second": first / 2, "tie": tie / 2})[0]
    return Verdict(verdict, merged, probs, probs, 1.0, 1.0)


def test_pair_labeller_keeps_flips_and_drops_by_verdict_and_margin():
    assert pair_action("first", 0.3, 0.2) == "keep" and pair_action("first", 0.1, 0.2) == "drop"
    assert pair_action("second", -0.3, 0.2) == "flip" and pair_action("tie", 0.0) == "drop"
    data = Dataset.from_list([{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(4)])
    judge = _FixedJudge([_verdict(1.6, 0.2, 0.2), _verdict(0.2, 1.6, 0.2), _verdict(0.8, 0.7, 0.5),
                         _verdict(0.5, 0.5, 1.0)])
    out = relabel_pairs(data, judge, min_margin=0.1)  # margins 0.7, −0.7, 0.05, 0 → keep, flip, drop, drop
    assert out.to_list() == [{"prompt": "q0", "chosen": "c0", "rejected": "r0"},
                             {"prompt": "q1", "chosen": "r1", "rejected": "c1"}]


def _pairs_file(tmp_path, n=3):
    """A jsonl of n rows: prompt, chosen, rejected and a 3-candidate list."""
    rows = [{"prompt": PROMPTS[i % 3], "chosen": RESPONSES[i % 3], "rejected": RESPONSES[(i - 1) % 3],
             "candidates": RESPONSES} for i in range(n)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, rows


def test_cli_writes_next_to_the_input_and_resumes(tmp_path):
    """Rows written next to the input equal the in-memory judge's results; a rerun adds only the missing rows."""
    data, rows = _pairs_file(tmp_path)
    common = ["--data", str(data), "--judge-model", "tiny-causal-lm", "--scale", "1", "10"]
    judge_cli(["score", *common, "--max-rows", "2"])
    out = tmp_path / "pairs.judge-score.jsonl"
    assert [json.loads(line)["row"] for line in out.read_text().splitlines()] == [0, 1]
    judge_cli(["score", *common])  # resumes: only row 2 is added
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    judge = TrustJudge(load_model("tiny-causal-lm"), load_processing_class("tiny-causal-lm"), scale=(1, 10))
    prompts = [r["prompt"] for r in rows]
    assert [line["row"] for line in lines] == [0, 1, 2]
    for column in ("chosen", "rejected"):
        expected = judge.score(prompts, [r[column] for r in rows])
        assert [line[f"score_{column}"] for line in lines] == pytest.approx(expected, rel=1e-5)
    judge_cli(["compare", *common])
    compared = [json.loads(line) for line in (tmp_path / "pairs.judge-compare.jsonl").read_text().splitlines()]
    verdicts = judge.compare_pairs(prompts, [r["chosen"] for r in rows], [r["rejected"] for r in rows])
    assert [c["verdict"] for c in compared] == [v.verdict for v in verdicts]
    assert [c["margin"] for c in compared] == pytest.approx([v.margin for v in verdicts], abs=1e-6)
    judge_cli(["consistency", *common, "--max-rows", "1"])
    summary = json.loads((tmp_path / "pairs.judge-consistency.summary.json").read_text())
    expected = judge_consistency(judge, prompts[:1], [rows[0]["candidates"]], progress=False).summary()
    assert summary == pytest.approx(expected, abs=1e-12) and (summary["pairs"], summary["triples"]) == (3, 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "", "rejected": "r"}) + "\n")
    with pytest.raises(SystemExit, match="row 0, column 'chosen'"):
        judge_cli(["compare", "--data", str(bad), "--judge-model", "tiny-causal-lm"])


def test_cli_refuses_to_resume_an_output_made_with_other_settings(tmp_path):
    """Another judge model, mode, scale or column is refused before the judge loads; --overwrite starts again."""
    data, _ = _pairs_file(tmp_path)
    common = ["--data", str(data), "--judge-model", "tiny-causal-lm"]
    judge_cli(["score", *common, "--scale", "1", "10", "--max-rows", "1"])
    out = tmp_path / "pairs.judge-score.jsonl"
    first = out.read_text()
    for changed, name in [(["--scale", "1", "5"], "scale"), (["--scale", "1", "10", "--mode", "geval"], "mode"),
                          (["--scale", "1", "10", "--columns", "chosen"], "columns")]:
        with pytest.raises(SystemExit, match=f"other settings.*{name}.*--overwrite"):
            judge_cli(["score", *common, *changed])
        assert out.read_text() == first  # nothing appended
    with pytest.raises(SystemExit, match="other settings.*judge_model: 'tiny-causal-lm' → 'tiny-qwen2-vl'"):
        judge_cli(["score", "--data", str(data), "--judge-model", "tiny-qwen2-vl", "--scale", "1", "10"])
    judge_cli(["score", *common, "--scale", "1", "5", "--overwrite"])
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, 1, 2]
    judge = TrustJudge(load_model("tiny-causal-lm"), load_processing_class("tiny-causal-lm"), scale=(1, 5))
    expected = judge.score(PROMPTS, RESPONSES)
    assert [line["score_chosen"] for line in lines] == pytest.approx(expected, rel=1e-5)
    # the same settings on other data: the committed rows' prompts differ from the data's
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit, match="line 1: row 0's prompt differs .* other data"):
        judge_cli(["score", "--data", str(other), "--output", str(out), "--judge-model", "tiny-causal-lm",
                   "--scale", "1", "5"])
    # an output this command did not make (no settings beside it) is refused too
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"row": 0, "x": 1}) + "\n")
    with pytest.raises(SystemExit, match="no settings"):
        judge_cli(["score", *common, "--output", str(foreign)])


class _Killed(Exception):
    """Stands for the process being killed."""


class _KillingJson:
    """The json module, except that ``dumps`` of the ``after``-th output row raises (a kill in the write loop)."""

    def __init__(self, after: int):
        self.after, self.rows = after, 0

    def __getattr__(self, name):
        return getattr(json, name)

    def dumps(self, obj, *args, **kwargs):
        if isinstance(obj, dict) and "row" in obj:
            self.rows += 1
            if self.rows > self.after:
                raise _Killed(f"killed before row line {self.rows}")
        return json.dumps(obj, *args, **kwargs)


@pytest.mark.parametrize("command", ["score", "compare", "consistency"])
def test_cli_killed_and_resumed_writes_exactly_the_rows_of_an_uninterrupted_run(tmp_path, monkeypatch, command):
    """5 rows, 2 per write: killed after 3 row lines (inside the second write) plus a torn half line, then resumed:
    the output (and the consistency summary) is byte-identical to an uninterrupted run's."""
    import prefalign.judges.cli as cli

    data, _ = _pairs_file(tmp_path, n=5)
    common = [command, "--data", str(data), "--judge-model", "tiny-causal-lm", "--scale", "1", "10",
              "--rows-per-write", "2", "--batch-size", "2"]
    judge_cli([*common, "--output", str(tmp_path / "whole.jsonl")])
    killed = tmp_path / "killed.jsonl"
    monkeypatch.setattr(cli, "json", _KillingJson(after=3))
    with pytest.raises(_Killed):
        judge_cli([*common, "--output", str(killed)])
    monkeypatch.setattr(cli, "json", json)
    with killed.open("a") as f:
        f.write('{"row": 4, "prompt": "torn wri')  # the kill also tore a line
    judge_cli([*common, "--output", str(killed)])
    assert killed.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()
    assert [json.loads(line)["row"] for line in killed.read_text().splitlines()] == [0, 1, 2, 3, 4]
    if command == "consistency":
        assert (tmp_path / "killed.summary.json").read_text() == (tmp_path / "whole.summary.json").read_text()

# ------------------------------------------------------------------ the embedded judge


@pytest.mark.slow
def test_embedded_judge_against_plain_forwards_on_its_real_tokenizer():
    """SmolLM2-135M (its tokenizer: '[[' merged with the space, digits split, ']]' one token): on 1..5 every mode by
    hand from the raw p(s) of plain forwards; on 1..100 the raw p of one-, two- and three-digit scores by hand, and
    the correct answer gets the highest expected score."""
    model, tokenizer = load_model("smollm2-135m-instruct").eval(), load_processing_class("smollm2-135m-instruct")
    prompts = ["What is the capital of France?"] * 3
    answers = ["The capital of France is Paris.", "asdf qwer zxcv", "I like turtles."]
    prefix = tokenizer("Rating: [[", add_special_tokens=False)["input_ids"]

    def answer_ids(label: str) -> list[int]:
        ids = tokenizer(f"Rating: [[{label}]]", add_special_tokens=False)["input_ids"]
        assert ids[: len(prefix)] == prefix
        return ids[len(prefix):]

    assert tokenizer.convert_ids_to_tokens(answer_ids("85")) == ["8", "5", "]]"]
    for (low, high), checked, items in (((1, 5), range(1, 6), 3), ((1, 100), (8, 85, 100), 1)):
        template = JudgeTemplate()
        hand = []
        for q, r in zip(prompts[:items], answers[:items]):
            text = template.pointwise.format(question=q, response=r, low=low, high=high,
                                             instruction=template.pointwise_direct)
            hand.append(_hand_raw_probs(model, _hand_context(tokenizer, text, "Rating:"),
                                        {s: answer_ids(str(s)) for s in checked}))
        judge = TrustJudge(model, tokenizer, scale=(low, high), batch_size=3)
        raw = judge.score_probabilities(prompts, answers)
        for got, p in zip(raw, hand):
            assert [got[s] for s in checked] == pytest.approx([p[s] for s in checked], rel=1e-4)
        if high == 5:
            for mode, by_hand in [("expected", lambda p: sum(s * v for s, v in p.items()) / sum(p.values())),
                                  ("geval", lambda p: sum(s * v for s, v in p.items())),
                                  ("discrete", lambda p: float(max(p, key=p.get)))]:
                judge.mode = mode
                assert [judge.score_from_distribution(p) for p in raw] == pytest.approx(
                    [by_hand(p) for p in hand], rel=1e-4), mode
        else:
            scores = [judge.score_from_distribution(p) for p in raw]
            assert scores[0] == max(scores) and scores[0] - min(scores) > 0.5  # Paris is rated highest


def test_judge_consistency_shows_each_prompt_its_own_images():
    """Every score and comparison of a prompt's candidates is given that prompt's images (they were left out, so a
    VLM judge read text alone); `prefalign judge consistency` passes a row's `images` column the same way."""

    class Recorder:
        def __init__(self):
            self.seen = []

        def score(self, prompts, responses, images=None):
            self.seen += list(zip(prompts, images or [None] * len(prompts)))
            return [float(len(r)) for r in responses]

        def compare_pairs(self, prompts, a, b, images=None):
            self.seen += list(zip(prompts, images or [None] * len(prompts)))
            return [_verdict(1.6, 0.2, 0.2) for _ in prompts]

    judge = Recorder()
    judge_consistency(judge, ["p0", "p1"], [["a", "bb", "ccc"], ["a", "bb"]], progress=False,
                      images=[["picture0"], ["picture1"]])
    assert judge.seen == [("p0", ["picture0"])] * 6 + [("p1", ["picture1"])] * 3


def test_cli_bad_rows_name_the_file_row_and_column(tmp_path):
    data, rows = _pairs_file(tmp_path)
    rows[1]["chosen"] = ""
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match=r"(?s)pairs\.jsonl, split 'train': 1 problem.*row 1, column 'chosen'"):
        judge_cli(["compare", "--data", str(data), "--judge-model", "tiny-causal-lm"])
