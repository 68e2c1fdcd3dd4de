"""Gradient-entanglement diagnostics (docs/methods/disentangled.md) against hand computations, a hand-built softmax model whose real
SGD steps are compared with the first-order prediction, and float64 brute force through real trainers."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer

from prefalign.data import load_preference_dataset
from prefalign.diagnostics import GradientEntanglementCallback, entanglement_stats
from prefalign.losses import pngd_loss
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.rrpo import RRPOConfig, RRPOTrainer

COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              per_device_train_batch_size=4, logging_steps=1, seed=0)


@pytest.mark.parametrize(
    "grad_w, grad_l, d_w, d_l, expected",
    [
        # ⟨g_w,g_l⟩ = 4, ‖g_w‖² = 5, ‖g_l‖² = 6: both conditions hold
        ([1.0, 2.0, 0.0], [2.0, 1.0, 1.0], 1.0, 1.0, (4.0, 5.0, 6.0, 4 / math.sqrt(30), True, True)),
        # ⟨⟩ = 3 > ‖g_w‖² = 1: the chosen log-prob falls (entanglement); 3 < ‖g_l‖² = 10: the rejected one falls
        ([1.0, 0.0], [3.0, 1.0], 1.0, 1.0, (3.0, 1.0, 10.0, 3 / math.sqrt(10), False, True)),
        # the same gradients, length-normalised weights: 1·1 > 0.2·3 but 0.2·10 < 1·3
        ([1.0, 0.0], [3.0, 1.0], 1.0, 0.2, (3.0, 1.0, 10.0, 3 / math.sqrt(10), True, False)),
        # ‖g_l‖² = 2.26 < ⟨⟩ = 3 < ‖g_w‖² = 4: the analysis code's min(‖g_w‖², ‖g_w‖²) would wrongly say "down"
        ([2.0, 0.0], [1.5, 0.1], 1.0, 1.0, (3.0, 4.0, 2.26, 3 / math.sqrt(9.04), True, False)),
        # a zero gradient: cosine 0, not nan
        ([0.0, 0.0], [1.0, 1.0], 1.0, 1.0, (0.0, 0.0, 2.0, 0.0, False, True)),
    ],
)
def test_entanglement_stats_by_hand(grad_w, grad_l, d_w, d_l, expected):
    stats = entanglement_stats(torch.tensor(grad_w), torch.tensor(grad_l), d_w=d_w, d_l=d_l)
    inner, norm_w_sq, norm_l_sq, cos, chosen_up, rejected_down = expected
    assert stats["inner"] == pytest.approx(inner) and stats["cos"] == pytest.approx(cos)
    assert stats["norm_w_sq"] == pytest.approx(norm_w_sq) and stats["norm_l_sq"] == pytest.approx(norm_l_sq)
    assert stats["chosen_up"] is chosen_up and stats["rejected_down"] is rejected_down


def test_entanglement_stats_rejects_bad_input():
    with pytest.raises(ValueError, match="flat gradients"):
        entanglement_stats(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="d_w and d_l"):
        entanglement_stats(torch.ones(2), torch.ones(2), d_l=0.0)


class Bigram(torch.nn.Module):
    """A tiny softmax model: π(y_t | y_{t−1}) = softmax(θ[y_{t−1}]), with token 0 as the start context."""

    def __init__(self, vocab: int = 5, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(0.1 * torch.randn(vocab, vocab, generator=generator, dtype=torch.float64))

    def forward(self, sequence: list[int]) -> torch.Tensor:
        """log π(sequence), summed over its tokens."""
        context = torch.tensor([0, *sequence[:-1]])
        return self.theta[context].log_softmax(-1).gather(-1, torch.tensor(sequence).unsqueeze(-1)).sum()


CHOSEN = [1, 2, 1]


def _gradients(model: Bigram, chosen: list[int], rejected: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    grad_w = torch.autograd.grad(model(chosen), model.theta)[0].flatten()
    grad_l = torch.autograd.grad(model(rejected), model.theta)[0].flatten()
    return grad_w, grad_l


def _sgd_step(model: Bigram, loss: torch.Tensor, lr: float) -> None:
    (grad,) = torch.autograd.grad(loss, model.theta)
    with torch.no_grad():
        model.theta -= lr * grad


@pytest.mark.parametrize("extra_token, entangled", [(2, True), (3, False)])
def test_dpo_step_lowers_chosen_exactly_when_the_condition_says(extra_token, entangled):
    """rejected = chosen + one token x, after context 1. The gradients share everything but the x term, so
    ⟨g_w,g_l⟩ − ‖g_w‖² = ⟨g_w, e_x − p(·|1)⟩: positive (chosen falls) when x = 2, the token chosen puts after 1."""
    model, beta, lr = Bigram(), 0.5, 1e-3
    rejected = [*CHOSEN, extra_token]
    reference = copy.deepcopy(model)
    grad_w, grad_l = _gradients(model, CHOSEN, rejected)
    stats = entanglement_stats(grad_w, grad_l)
    assert stats["chosen_up"] is not entangled  # the construction does what it says

    with torch.no_grad():
        before_w, before_l = model(CHOSEN), model(rejected)
        z = (before_w - reference(CHOSEN)) - (before_l - reference(rejected))
    loss = -F.logsigmoid(beta * ((model(CHOSEN) - reference(CHOSEN)) - (model(rejected) - reference(rejected))))
    _sgd_step(model, loss, lr)
    with torch.no_grad():
        delta_w, delta_l = model(CHOSEN) - before_w, model(rejected) - before_l

    c = beta * torch.sigmoid(-beta * z)  # −m′ for m(z) = −logsigmoid(βz); d_w = d_l = 1
    inner, norm_w_sq, norm_l_sq = grad_w @ grad_l, grad_w @ grad_w, grad_l @ grad_l
    predicted_w, predicted_l = lr * c * (norm_w_sq - inner), lr * c * (inner - norm_l_sq)
    assert bool(delta_w > 0) is stats["chosen_up"] and bool(delta_l < 0) is stats["rejected_down"]
    assert delta_w.item() == pytest.approx(predicted_w.item(), rel=2e-2)
    assert delta_l.item() == pytest.approx(predicted_l.item(), rel=2e-2)


def test_pngd_step_raises_chosen_and_lowers_rejected_on_the_entangled_pair():
    """Where DPO lowers log π(y_w), one step along c·(g_w/‖g_w‖ − g_l/‖g_l‖) raises it and lowers log π(y_l), by
    η·c·‖g‖·(1 − cos) to first order (docs/methods/disentangled.md, design (a))."""
    model, beta, lr = Bigram(), 0.5, 1e-3
    rejected = [*CHOSEN, 2]
    reference = copy.deepcopy(model)
    grad_w, grad_l = _gradients(model, CHOSEN, rejected)
    assert not entanglement_stats(grad_w, grad_l)["chosen_up"]  # DPO would lower the chosen log-prob here
    norm_w, norm_l = grad_w.norm(), grad_l.norm()
    cos = (grad_w @ grad_l) / (norm_w * norm_l)

    with torch.no_grad():
        before_w, before_l = model(CHOSEN), model(rejected)
        ref_w, ref_l = reference(CHOSEN), reference(rejected)
    loss, chosen_reward, rejected_reward = pngd_loss(model(CHOSEN)[None], model(rejected)[None], ref_w[None],
                                                     ref_l[None], norm_w[None], norm_l[None], beta=beta)
    assert chosen_reward.item() == 0.0 and rejected_reward.item() == 0.0  # DPO's rewards, policy = reference
    assert loss.item() == pytest.approx(math.log(2))  # its value is DPO's (policy = reference)
    _sgd_step(model, loss.sum(), lr)
    with torch.no_grad():
        delta_w, delta_l = model(CHOSEN) - before_w, model(rejected) - before_l
    c = beta * 0.5
    assert delta_w > 0 and delta_l < 0
    assert delta_w.item() == pytest.approx((lr * c * norm_w * (1 - cos)).item(), rel=2e-2)
    assert delta_l.item() == pytest.approx((-lr * c * norm_l * (1 - cos)).item(), rel=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# The callback on real trainers (tiny random model)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return load_processing_class("tiny-causal-lm")


@pytest.fixture(scope="module")
def phrase_pairs():
    return load_preference_dataset("wordnet-phrases", split="train").select(range(12))


def _untagged(dataset: Dataset) -> Dataset:
    return dataset.map(lambda row: {side: [{**row[side][0], "content": row[side][0]["content"].replace(
        "<MASK>", "").replace("</MASK>", "")}] for side in ("chosen", "rejected")})


def _brute_force_stats(model, batch) -> dict[str, float]:
    """Means over the batch's pairs, from full logits in float64 through the padded batch, one gradient per row."""
    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    logps = (token_logps * batch["completion_mask"][:, 1:]).sum(-1)
    grads = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(lp, params, retain_graph=True)]) for lp in logps]
    n = len(logps) // 2
    inner = torch.stack([grads[i] @ grads[n + i] for i in range(n)])
    norm_w, norm_l = (torch.stack([g @ g for g in grads[s]]) for s in (slice(0, n), slice(n, None)))
    return {"inner": inner.mean().item(), "norm_w_sq": norm_w.mean().item(), "norm_l_sq": norm_l.mean().item(),
            "cos": (inner / (norm_w * norm_l).sqrt()).mean().item(), "chosen_up": (norm_w > inner).double().mean().item(),
            "rejected_down": (norm_l > inner).double().mean().item(), "logps_chosen": logps[:n].mean().item()}


def test_callback_matches_a_float64_brute_force_and_logs_through_dpo_trainer(tmp_path, phrase_pairs, tokenizer):
    """LoRA (random B, so g is not trivially zero) on TRL's DPOTrainer: the probe statistics equal a full-logits
    float64 computation over the LoRA parameters, and the values land in log_history at the checked steps."""
    pairs = _untagged(phrase_pairs)
    args = DPOConfig(output_dir=str(tmp_path), max_steps=4, learning_rate=1e-2, **COMMON)
    trainer = DPOTrainer(load_model("tiny-causal-lm"), args=args, train_dataset=pairs.select(range(8)),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    callback = GradientEntanglementCallback(pairs.select(range(8, 12)), every_n_steps=2, max_pairs=3).attach(trainer)
    assert callback.batch["input_ids"].shape[0] == 6 and not callback.length_normalised

    measured = callback.measure()
    expected = _brute_force_stats(trainer.model, callback.batch)
    assert all(n.startswith("base_model") and "lora_" in n for n, p in trainer.model.named_parameters()
               if p.requires_grad)
    for key, value in expected.items():
        assert measured[f"entanglement/{key}"] == pytest.approx(value, rel=1e-3, abs=1e-6), key

    callback.previous = None
    trainer.train()
    checked = [e for e in trainer.state.log_history if "entanglement/inner" in e]
    assert [e["step"] for e in checked] == [2, 4]
    assert all("rewards/margins" in entry for entry in checked)  # alongside the trainer's own metrics
    final = _brute_force_stats(trainer.model, callback.batch)  # step 4 was measured on the final weights
    for key, value in final.items():
        assert checked[1][f"entanglement/{key}"] == pytest.approx(value, rel=1e-3, abs=1e-6), key
    assert checked[1]["entanglement/delta_logps_chosen"] == pytest.approx(
        checked[1]["entanglement/logps_chosen"] - checked[0]["entanglement/logps_chosen"], abs=1e-4)
    assert checked[0]["entanglement/delta_logps_chosen"] != 0.0  # training moved the probe


def test_callback_on_rrpo_trainer_with_tagged_probe(tmp_path, phrase_pairs, tokenizer):
    """RRPOTrainer: the probe rows keep their <MASK> tags (RRPO's format) and are prepared the RRPO way."""
    policy, ref = load_model("tiny-causal-lm"), load_model("tiny-causal-lm")
    args = RRPOConfig(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2, **COMMON)
    trainer = RRPOTrainer(policy, ref, args=args, train_dataset=phrase_pairs.select(range(8)),
                          processing_class=tokenizer)
    callback = GradientEntanglementCallback(phrase_pairs.select(range(8, 12)), every_n_steps=1).attach(trainer)
    assert "phrase_ids" in callback.batch and "MASK" not in tokenizer.decode(callback.batch["input_ids"][0])
    trainer.train()
    checked = [e for e in trainer.state.log_history if "entanglement/inner" in e]
    assert len(checked) == 2 and "kl/chosen" in checked[0]
    final = _brute_force_stats(trainer.model, callback.batch)  # step 2 was measured on the final weights
    for key, value in final.items():
        assert checked[1][f"entanglement/{key}"] == pytest.approx(value, rel=1e-3, abs=1e-6), key


def test_length_normalised_losses_use_inverse_lengths(tmp_path, phrase_pairs, tokenizer):
    args = DPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid_norm"], **COMMON)
    trainer = DPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"), args=args,
                         train_dataset=_untagged(phrase_pairs), processing_class=tokenizer)
    assert GradientEntanglementCallback(_untagged(phrase_pairs), max_pairs=2).attach(trainer).length_normalised


class _OpOutputs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of every tensor an operator returns while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.numels += [t.numel() for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_pair_gradient_stats_never_builds_a_whole_gradient_vector(tmp_path, phrase_pairs, tokenizer):
    """pngd's per-pair statistics are accumulated parameter by parameter: no tensor with as many elements as all the
    trainable parameters together is ever created (a flat copy of a gradient is one), so the extra memory per pair
    is the two gradients autograd returns, with no flat copies on top; the values equal the float64 brute force."""
    from prefalign.diagnostics import pair_gradient_stats

    pairs = _untagged(phrase_pairs)
    args = DPOConfig(output_dir=str(tmp_path), **COMMON)
    trainer = DPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"), args=args,
                         train_dataset=pairs.select(range(4)), processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    assert max(p.numel() for p in params) < n_params // 2  # so a whole-vector tensor is told apart from any one

    with _OpOutputs() as spy:
        stats = pair_gradient_stats(model, batch)
    assert spy.numels and n_params not in spy.numels  # (activations may be larger: [tokens, 32768] in the MLP)
    expected = _brute_force_stats(model, batch)
    assert stats["inner"].mean().item() == pytest.approx(expected["inner"], rel=1e-4)
    assert stats["norm_w_sq"].mean().item() == pytest.approx(expected["norm_w_sq"], rel=1e-4)
    assert stats["norm_l_sq"].mean().item() == pytest.approx(expected["norm_l_sq"], rel=1e-4)


def test_length_normalised_conditions_use_d_equal_one_over_the_completion_length(tmp_path, phrase_pairs, tokenizer):
    """Hand-built pairs: a 3-token prompt, a 2-token chosen completion and a 9-token rejected one that starts with
    the chosen tokens, so d_w = 1/2, d_l = 1/9. The conditions are d_w‖g_w‖² > d_l⟨g_w,g_l⟩ and
    d_l‖g_l‖² > d_w⟨g_w,g_l⟩ with the float64 brute-force products; on these pairs "rejected down" flips between
    d = 1 and d = 1/|y|, so a wrong d is caught."""
    from prefalign.diagnostics import pair_gradient_stats

    trainer = DPOTrainer(load_model("tiny-causal-lm"), load_model("tiny-causal-lm"),
                         args=DPOConfig(output_dir=str(tmp_path), **COMMON),
                         train_dataset=_untagged(phrase_pairs).select(range(2)), processing_class=tokenizer)
    model, n, prompt, len_w, len_l = trainer.model, 3, 3, 2, 9
    ids = torch.randint(5, 1000, (2 * n, prompt + len_l), generator=torch.Generator().manual_seed(0))
    ids[:, :prompt] = ids[:1, :prompt]
    ids[n:, prompt:prompt + len_w] = ids[:n, prompt:prompt + len_w]
    ids[:n, prompt + len_w:] = 0
    attention, completion = torch.ones_like(ids), torch.zeros_like(ids)
    attention[:n, prompt + len_w:] = 0
    completion[:n, prompt:prompt + len_w] = 1
    completion[n:, prompt:] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}

    params = [p for p in model.parameters() if p.requires_grad]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    logps = (logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1) * completion[:, 1:]).sum(-1)
    grads = [torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(lp, params, retain_graph=True)])
             for lp in logps]
    inner = torch.stack([grads[i] @ grads[n + i] for i in range(n)])
    norm_w, norm_l = torch.stack([g @ g for g in grads[:n]]), torch.stack([g @ g for g in grads[n:]])

    normalised = pair_gradient_stats(model, batch, length_normalised=True)
    plain = pair_gradient_stats(model, batch)
    assert normalised["chosen_up"].tolist() == (norm_w / len_w > inner / len_l).tolist()
    assert normalised["rejected_down"].tolist() == (norm_l / len_l > inner / len_w).tolist()
    assert plain["rejected_down"].tolist() == (norm_l > inner).tolist()
    assert normalised["rejected_down"].tolist() != plain["rejected_down"].tolist()  # d matters on these pairs
    torch.testing.assert_close(normalised["inner"], inner, rtol=1e-4, atol=1e-3)
