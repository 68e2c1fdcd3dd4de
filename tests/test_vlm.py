"""Vision-language support (tiny Qwen2-VL): `prefalign.generation.generate` with images; DPO (`PackedDPOTrainer`) and
disentangled DPO on image rows through the shared forward; D²O and DPO with images in 2 DDP processes. The other
trainers' and builders' vision tests live in their test files (test_d2o, test_negatives, test_pairwise, test_delta)."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import perturbed_copy
from datasets import Dataset
from PIL import Image
from test_d2o import _vision_sequence_logps
from trl import DPOConfig

from prefalign.generation import generate
from prefalign.models import load_model, load_processing_class
from prefalign.trainers.disentangled import MODES, DisentangledDPOConfig, DisentangledDPOTrainer
from prefalign.trainers.dpo import PackedDPOConfig, PackedDPOTrainer

PROMPT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@pytest.fixture(scope="module")
def tiny_vlm():
    return load_model("tiny-qwen2-vl"), load_processing_class("tiny-qwen2-vl")


def test_generate_with_images_follows_each_prompts_image(tiny_vlm):
    """Greedy answers (a perturbed tiny model, whose logits are sharp enough for images to matter) to one prompt text
    with three noise pictures: the three answers differ, and swapping the images of prompts 0 and 1 swaps exactly
    their answers, so each answer follows its own prompt's image within the batch."""
    model, processor = tiny_vlm
    model = perturbed_copy(model, scale=0.5)
    pictures = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (56, 56, 3), dtype=np.uint8))
                for seed in range(3)]
    options = dict(do_sample=False, max_new_tokens=6, batch_size=3, progress=False)
    first = generate(model, processor, [PROMPT] * 3, images=[[p] for p in pictures], **options)
    second = generate(model, processor, [PROMPT] * 3, images=[[pictures[1]], [pictures[0]], [pictures[2]]], **options)
    assert len({answer[0] for answer in first}) == 3
    assert second == [first[1], first[0], first[2]]


def test_generate_refuses_images_it_cannot_use(tiny_vlm):
    model, processor = tiny_vlm
    image = Image.new("RGB", (56, 56))
    with pytest.raises(ValueError, match="one list per prompt"):
        generate(model, processor, [PROMPT] * 2, images=[[image]], progress=False)
    with pytest.raises(ValueError, match="processor"):
        generate(model, processor.tokenizer, [PROMPT], images=[[image]], progress=False)
    with pytest.raises(ValueError, match="backend='transformers' only"):
        generate("tiny-qwen2-vl", processor, [PROMPT], images=[[image]], backend="vllm", progress=False)


def test_vision_column_helpers():
    """has_vision_columns / vision_as_images / images_per_row on hand-made rows: a single `image` becomes a one-image
    list, video frames become images (one prompt part each), text rows are untouched, both `image` and `images` is
    refused."""
    from prefalign.data import PreferenceDataError, has_vision_columns, images_per_row, vision_as_images

    red, blue = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))
    single = Dataset.from_list([{"prompt": "a", "image": red}, {"prompt": "b", "image": blue}])
    video = Dataset.from_list([{"prompt": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}],
                                "video": [red, blue]}])
    text = Dataset.from_list([{"prompt": "a"}])
    assert [has_vision_columns(d) for d in (single, video, text)] == [True, True, False]
    assert has_vision_columns(["prompt", "images"]) and not has_vision_columns(["prompt"])
    converted = vision_as_images(single)
    assert converted.column_names == ["prompt", "images"]
    assert [[np.asarray(im).tolist() for im in row] for row in converted["images"]] == [
        [np.asarray(red).tolist()], [np.asarray(blue).tolist()]]
    frames = vision_as_images(video)
    assert len(frames[0]["images"]) == 2
    assert [p["type"] for p in frames[0]["prompt"][0]["content"]] == ["image", "image", "text"]
    assert vision_as_images(text) is text and images_per_row(text[:]) is None
    assert images_per_row({"image": ["x", "y"]}) == [["x"], ["y"]]
    assert images_per_row({"images": [("x", "y"), ()]}) == [["x", "y"], []]
    assert [len(row) for row in images_per_row(converted)] == [1, 1]
    with pytest.raises(PreferenceDataError, match="'image' and 'images'"):
        vision_as_images(Dataset.from_list([{"prompt": "a", "image": red, "images": [blue]}]))


# ---- DPO and disentangled DPO on image rows -----------------------------------------------------------------------

COLOURS = [((255, 0, 0), "red"), ((0, 0, 255), "blue"), ((0, 255, 0), "green"), ((9, 9, 9), "black")]
COMMON = dict(report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, save_strategy="no",
              logging_steps=1, seed=0, train_sampling_strategy="sequential", max_length=None,
              lr_scheduler_type="constant")


def _pair_rows(swap: bool = False) -> Dataset:
    """Four preference pairs about a plain-coloured picture; ``swap``: the pictures of rows 0 and 1 exchanged."""
    pictures = [Image.new("RGB", (56, 56), rgb) for rgb, _ in COLOURS]
    if swap:
        pictures[0], pictures[1] = pictures[1], pictures[0]
    return Dataset.from_list([{"images": [picture],
                               "prompt": [{"role": "user", "content": [{"type": "image"},
                                                                       {"type": "text", "text": "What colour is it?"}]}],
                               "chosen": [{"role": "assistant", "content": f"It is {colour}."}],
                               "rejected": [{"role": "assistant", "content": "A cat with a hat."}]}
                              for picture, (_, colour) in zip(pictures, COLOURS)])


def _vision_trainer(tmp_path, dataset, policy=None, ref=None, mode: str | None = None, **config):
    """PackedDPOTrainer (``mode`` None) or DisentangledDPOTrainer on the tiny Qwen2-VL."""
    policy = load_model("tiny-qwen2-vl") if policy is None else policy
    ref = load_model("tiny-qwen2-vl") if ref is None else ref
    config = {**COMMON, "output_dir": str(tmp_path / "vlm"), **config}
    if mode is None:
        return PackedDPOTrainer(policy, ref, args=DPOConfig(**config), train_dataset=dataset,
                                processing_class=load_processing_class("tiny-qwen2-vl"))
    return DisentangledDPOTrainer(policy, ref, args=DisentangledDPOConfig(disentangle=mode, **config),
                                  train_dataset=dataset, processing_class=load_processing_class("tiny-qwen2-vl"))


def _float64_copies(*models) -> list:
    """Float64 copies, taken before a trainer is built (accelerate's prepare rebinds a model's forward, and a copy
    taken afterwards would still run the original's)."""
    return [copy.deepcopy(model).double() for model in models]


def _brute_force_ratios(policy64, ref64, rows: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π − Σ log π_ref of each row's chosen and rejected, in float64 (float64 models), each sequence processed
    alone with its own picture: ([B], [B])."""
    processor = load_processing_class("tiny-qwen2-vl")
    with torch.no_grad():
        ratios = [[_vision_sequence_logps(policy64, processor, row, row[side])
                   - _vision_sequence_logps(ref64, processor, row, row[side]) for row in rows]
                  for side in ("chosen", "rejected")]
    return torch.stack(ratios[0]), torch.stack(ratios[1])


def _first_batch(trainer) -> dict:
    return next(iter(trainer.get_train_dataloader()))


def test_dpo_with_images_trains_and_its_log_probs_follow_each_rows_picture(tmp_path):
    """PackedDPOTrainer on image rows: the batch's per-sequence log-probs equal float64 log-probs of each sequence
    processed alone with its own picture; swapping the pictures of rows 0 and 1 changes exactly their chosen and
    rejected log-probs and the loss (DPO's, by hand from the brute force); training starts at log 2 and moves."""
    policy, ref = perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2), load_model("tiny-qwen2-vl")
    policy64, ref64 = _float64_copies(policy, ref)
    results = []
    for swap in (False, True):
        rows = _pair_rows(swap)
        trainer = _vision_trainer(tmp_path, rows, policy, ref, beta=0.5, per_device_train_batch_size=4)
        batch = _first_batch(trainer)
        with torch.no_grad():
            logps = trainer.sequence_log_probs(trainer.model, batch).per_token.sum(-1)
            loss = trainer.compute_loss(trainer.model, batch).item()
        processor = load_processing_class("tiny-qwen2-vl")
        with torch.no_grad():
            expected = torch.stack([_vision_sequence_logps(policy64, processor, row, row[side])
                                    for side in ("chosen", "rejected") for row in rows])
        torch.testing.assert_close(logps.double(), expected, rtol=0, atol=2e-4)
        chosen, rejected = _brute_force_ratios(policy64, ref64, rows)
        assert loss == pytest.approx(-torch.nn.functional.logsigmoid(0.5 * (chosen - rejected)).mean().item(),
                                     abs=1e-5)
        results.append((logps, loss))
    moved, kept = [0, 1, 4, 5], [2, 3, 6, 7]  # layout [chosen 0..3; rejected 0..3]
    assert (results[0][0][moved] - results[1][0][moved]).abs().min() > 1e-3
    torch.testing.assert_close(results[0][0][kept], results[1][0][kept], rtol=0, atol=1e-5)
    assert abs(results[0][1] - results[1][1]) > 1e-4

    trainer = _vision_trainer(tmp_path, _pair_rows(), max_steps=2, learning_rate=1e-2, per_device_train_batch_size=2)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[1] < losses[0] - 1e-3


@pytest.mark.parametrize("mode", [None, "token_mask"], ids=["dpo", "token_mask"])
def test_video_frames_train_as_images(tmp_path, mode):
    """A `video` column (frame lists, `{"type": "video"}` prompt parts) is collated exactly as the same frames given
    as `images` with one image part per frame, and trains."""
    frames = [[Image.new("RGB", (56, 56), (60 * i, 30 * j, 90)) for j in range(2)] for i in range(4)]
    question = {"type": "text", "text": "What happens?"}

    def rows(video: bool) -> Dataset:
        parts = [{"type": "video"}] if video else [{"type": "image"}, {"type": "image"}]
        return Dataset.from_list([{("video" if video else "images"): clip,
                                   "prompt": [{"role": "user", "content": [*parts, question]}],
                                   "chosen": [{"role": "assistant", "content": f"Scene {i}."}],
                                   "rejected": [{"role": "assistant", "content": "Nothing."}]}
                                  for i, clip in enumerate(frames)])

    batches = [_first_batch(_vision_trainer(tmp_path, rows(video), mode=mode, per_device_train_batch_size=4))
               for video in (True, False)]
    assert batches[0].keys() == batches[1].keys() and batches[0]["image_grid_thw"].shape[0] == 2 * 4 * 2
    for key in batches[0]:
        torch.testing.assert_close(batches[0][key], batches[1][key], rtol=0, atol=0)
    trainer = _vision_trainer(tmp_path, rows(True), mode=mode, max_steps=1, per_device_train_batch_size=2)
    trainer.train()
    assert [e["loss"] for e in trainer.state.log_history if "loss" in e] == [pytest.approx(math.log(2), abs=1e-6)]


def test_dpo_pair_mining_with_images_records_every_row(tmp_path):
    """pair_mining on image rows: the rows are numbered as given (TRL skips the text preparation for vision data)
    and, with the policy left at the reference (learning rate 0), every pair's recorded loss is log 2."""
    config = {**COMMON, "output_dir": str(tmp_path / "vlm-mining"), "pair_mining": "dbpm", "num_train_epochs": 1,
              "per_device_train_batch_size": 2, "learning_rate": 0.0}
    trainer = PackedDPOTrainer(load_model("tiny-qwen2-vl"), load_model("tiny-qwen2-vl"),
                               args=PackedDPOConfig(**config), train_dataset=_pair_rows(),
                               processing_class=load_processing_class("tiny-qwen2-vl"))
    trainer.train()
    history = trainer.pair_mining.memory.history
    assert sorted(history) == [0, 1, 2, 3]
    assert all(abs(epochs[0] - math.log(2)) < 1e-6 for epochs in history.values())


@pytest.mark.parametrize("mode", [None, *MODES], ids=["dpo", *MODES])
def test_padding_free_with_images_is_refused_at_start(tmp_path, mode):
    with pytest.raises(NotImplementedError, match="padding_free=True packs text sequences only"):
        _vision_trainer(tmp_path, _pair_rows(), mode=mode, padding_free=True)


@pytest.mark.parametrize("mode", MODES)
def test_disentangled_with_images_trains_and_its_loss_follows_each_rows_picture(tmp_path, mode):
    """Each disentangled mode on image rows: the loss of a batch equals its formula from float64 log-ratios of each
    sequence processed alone with its own picture (pngd's value and token_mask with shared_token_weight=1 are DPO's;
    anchored with γ_w = 0.1, γ_l = −0.2), and so changes when rows 0 and 1 swap pictures; training starts at the
    policy = reference value and moves."""
    beta = 0.5
    policy, ref = perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2), load_model("tiny-qwen2-vl")
    extra = {"token_mask": {"shared_token_weight": 1.0},
             "anchored": {"chosen_anchor": 0.1, "rejected_anchor": -0.2}}.get(mode, {})
    policy64, ref64 = _float64_copies(policy, ref)
    losses = []
    for swap in (False, True):
        rows = _pair_rows(swap)
        trainer = _vision_trainer(tmp_path, rows, policy, ref, mode=mode, beta=beta, per_device_train_batch_size=4,
                                  **extra)
        loss = trainer.compute_loss(trainer.model, _first_batch(trainer)).item()  # pngd: with its gradient norms
        chosen, rejected = _brute_force_ratios(policy64, ref64, rows)
        if mode == "anchored":
            expected = -(torch.nn.functional.logsigmoid(beta * chosen - 0.1)
                         + torch.nn.functional.logsigmoid(-beta * rejected + 0.2)).mean()
        else:
            expected = -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()
        assert loss == pytest.approx(expected.item(), abs=1e-5)
        losses.append(loss)
    assert abs(losses[0] - losses[1]) > 1e-4

    trainer = _vision_trainer(tmp_path, _pair_rows(), mode=mode, max_steps=2, learning_rate=1e-2,
                              per_device_train_batch_size=2)
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged[0] == pytest.approx((2 if mode == "anchored" else 1) * math.log(2), abs=1e-6)
    assert logged[1] < logged[0] - 1e-3


def test_pngd_normalises_by_gradients_that_include_the_vision_tower(tmp_path):
    """pngd's gradient on image rows is −mean_i c_i·(g_w/‖g_w‖ − g_l/‖g_l‖) with g = ∇ log π(y) over every weight,
    the vision tower's included (brute force: float64 backward of each sequence alone with its picture); the vision
    tower's share of ‖g‖ is large enough that norms over the language model alone would fail this test."""
    beta = 0.5
    policy, ref = perturbed_copy(load_model("tiny-qwen2-vl"), scale=0.2), load_model("tiny-qwen2-vl")
    policy64, ref64 = _float64_copies(policy, ref)
    rows = _pair_rows().select(range(2))
    trainer = _vision_trainer(tmp_path, rows, policy, ref, mode="pngd", beta=beta, per_device_train_batch_size=2)
    trainer.model.zero_grad()
    trainer.compute_loss(trainer.model, _first_batch(trainer)).backward()
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    got = {n: p.grad.double() for n, p in trainer.model.named_parameters() if p.requires_grad}

    processor = load_processing_class("tiny-qwen2-vl")
    params64 = dict(policy64.named_parameters())
    chosen, rejected = _brute_force_ratios(policy64, ref64, rows)
    coefficient = beta * torch.sigmoid(-beta * (chosen - rejected))
    expected = {n: torch.zeros_like(g) for n, g in got.items()}
    visual_share = []
    for i, row in enumerate(rows):
        directions = []
        for side in ("chosen", "rejected"):
            logp = _vision_sequence_logps(policy64, processor, row, row[side])
            grads = dict(zip(names, torch.autograd.grad(logp, [params64[n] for n in names], allow_unused=True)))
            grads = {n: torch.zeros_like(got[n]) if g is None else g for n, g in grads.items()}
            norm_sq = sum(g.pow(2).sum() for g in grads.values())
            visual_share.append(sum(g.pow(2).sum() for n, g in grads.items() if ".visual." in n) / norm_sq)
            directions.append({n: g / norm_sq.sqrt() for n, g in grads.items()})
        for n in names:
            expected[n] -= coefficient[i] * (directions[0][n] - directions[1][n]) / len(rows)
    assert min(visual_share) > 0.01  # without the vision tower the norms (and so the gradient) would be off by > 0.5%
    for subset in (names, [n for n in names if ".visual." in n]):
        difference = torch.cat([(got[n] - expected[n]).flatten() for n in subset]).norm()
        assert difference / torch.cat([expected[n].flatten() for n in subset]).norm() < 1e-3


@pytest.mark.multiproc
def test_d2o_and_dpo_with_images_two_processes_equal_one(tmp_path):
    """D²O, then DPO, on image rows: 2 DDP processes × 2 rows give the logged losses of 1 process × 4 rows (same rows,
    sequential sampler), and the losses move from log 2. Then RRPO with drop_unaligned, where the processes hold 1
    and 2 of the 3 kept pairs: its logged per-pair means are over the kept pairs, as in one process (one launch for
    the three trainers)."""
    import json
    import math
    import subprocess
    import sys

    from conftest import REPO, accelerate_launch

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "tests/vlm_ddp_driver.py", str(one), "4"], cwd=REPO, check=True,
                   capture_output=True)
    for _ in range(2):  # one rerun when a worker was killed by a signal (a rare gloo abort seen once in 6 CI runs)
        launch = subprocess.run([*accelerate_launch("ddp.yaml"), "tests/vlm_ddp_driver.py", str(two), "2"],
                                cwd=REPO, capture_output=True, text=True)
        if launch.returncode == 0 or "Signal" not in launch.stderr:
            break
    errors = [line for line in launch.stderr.splitlines() if "Error" in line or "error" in line]
    assert launch.returncode == 0, f"rc {launch.returncode}: " + "\n".join(errors)[-3000:] + launch.stderr[-2000:]
    single, double = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert (single["processes"], double["processes"]) == (1, 2)
    assert len(single["losses"]) == 3 and single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(single["losses"][-1] - math.log(2)) > 1e-3
    assert double["losses"] == pytest.approx(single["losses"], abs=1e-5)
    assert len(single["dpo_losses"]) == 3 and single["dpo_losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(single["dpo_losses"][-1] - math.log(2)) > 1e-3
    assert double["dpo_losses"] == pytest.approx(single["dpo_losses"], abs=1e-5)
    per_pair = [k for k in single["rrpo_log"] if k.split("/")[0] in ("logps", "phrase_tokens", "kl", "rewards")]
    assert {"logps/chosen", "logps/rejected", "phrase_tokens/chosen"} <= set(per_pair)
    for key in per_pair:
        assert double["rrpo_log"][key] == pytest.approx(single["rrpo_log"][key], rel=1e-5, abs=1e-6), key
