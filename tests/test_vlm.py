"""Vision-language support shared by builders and trainers (tiny Qwen2-VL): `prefalign.generation.generate` with
images; the trainers' and builders' own vision tests live in their test files (test_d2o, test_negatives,
test_pairwise)."""

import numpy as np
import pytest
from conftest import perturbed_copy
from PIL import Image

from prefalign.generation import generate
from prefalign.models import load_model, load_processing_class

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


@pytest.mark.multiproc
def test_d2o_with_images_two_processes_equal_one(tmp_path):
    """D²O on image rows: 2 DDP processes × 2 rows give the logged losses of 1 process × 4 rows (same rows, sequential
    sampler), and the losses move from log 2."""
    import json
    import math
    import subprocess
    import sys

    from conftest import REPO, accelerate_launch

    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "tests/vlm_ddp_driver.py", str(one), "4"], cwd=REPO, check=True,
                   capture_output=True)
    launch = subprocess.run([*accelerate_launch("ddp.yaml"), "tests/vlm_ddp_driver.py", str(two), "2"], cwd=REPO,
                            capture_output=True, text=True)
    errors = [line for line in launch.stderr.splitlines() if "Error" in line or "error" in line]
    assert launch.returncode == 0, f"rc {launch.returncode}: " + "\n".join(errors)[-3000:]
    single, double = (json.loads((d / "losses.json").read_text()) for d in (one, two))
    assert (single["processes"], double["processes"]) == (1, 2)
    assert len(single["losses"]) == 3 and single["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(single["losses"][-1] - math.log(2)) > 1e-3
    assert double["losses"] == pytest.approx(single["losses"], abs=1e-5)
