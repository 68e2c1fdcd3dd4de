"""Shared plumbing of the claim experiments: the seeds loop, the spread over seeds, the result JSON and the plot.

Every experiment script (`benchmarks/experiments/<claim>.py`) trains its arms once per seed, collects one number
per (arm, metric, seed) and calls `write_result`, which stores `results/<claim>.json`:

    {"claim", "title", "claim_text", "command", "smoke", "setup": {"model", "data", "steps", "learning_rate",
     "seeds", ...}, "metrics": [names], "arms": {arm: {"per_seed": {metric: [value per seed]},
     "summary": {metric: {"n", "mean", "min", "max", "ci95"}}, "seeds" (only when not setup's)}},
     "curves": {...}, "outcome", "seconds", "commit"}   (floats rounded to 6 significant digits)

`report.py` turns these files into the results section of docs/results.md. `--smoke` runs (tiny random models,
1–2 steps) write to a temporary folder unless `--results-dir` is given, and are flagged `"smoke": true` so the
report never shows them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Two-sided 95% Student t quantiles t_{0.975, df} for df = 1..30 (standard tables); larger df use 1.96.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The two-sided 95% Student t quantile for ``df`` ≥ 1 degrees of freedom (1.96 beyond df = 30)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be ≥ 1, got {df}")
    return T_975[df - 1] if df <= len(T_975) else 1.96


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, min, max and the 95% t-interval of the mean (mean ± t·s/√n, None for one value) over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread: no values")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"spread: a value is NaN: {values}")
    mean = statistics.fmean(values)
    ci95 = None
    if len(values) > 1:
        half = t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
        ci95 = [mean - half, mean + half]
    return {"n": len(values), "mean": mean, "min": min(values), "max": max(values), "ci95": ci95}


def experiment_parser(doc: str, default_seeds: Sequence[int]) -> argparse.ArgumentParser:
    """An argument parser with the options every experiment shares: --smoke, --seeds, --results-dir, --work-dir."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny random model, 1–2 steps, 2 seeds: checks the plumbing in seconds (default results "
                             "folder: a temporary one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"seeds, one training run per arm each (default: {' '.join(map(str, default_seeds))}; "
                             "with --smoke: 0 1)")
    parser.set_defaults(default_seeds=list(default_seeds))
    parser.add_argument("--results-dir", type=Path, default=None,
                        help=f"where <claim>.json and .png go (default: {RESULTS_DIR.relative_to(REPO)}, or a "
                             "temporary folder with --smoke)")
    parser.add_argument("--work-dir", type=Path, default=None, help="training outputs (default: a temporary folder)")
    return parser


def prepare_run(opts: argparse.Namespace, claim: str) -> tuple[Path, Path]:
    """One CPU thread unless OMP_NUM_THREADS says otherwise, the seeds, the tiny models for --smoke, quiet libraries;
    returns (results folder, work folder)."""
    import datasets
    import torch
    import transformers

    if opts.seeds is None:
        opts.seeds = [0, 1] if opts.smoke else opts.default_seeds
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    if opts.smoke:
        sys.path.insert(0, str(REPO / "tests"))
        from tiny_models import register_tiny_models  # the test suite's tiny random models, by short name

        register_tiny_models()
    results = opts.results_dir or (Path(tempfile.mkdtemp(prefix=f"{claim}-smoke-")) if opts.smoke else RESULTS_DIR)
    work = opts.work_dir or Path(tempfile.mkdtemp(prefix=f"{claim}-runs-"))
    results.mkdir(parents=True, exist_ok=True)
    return results, work


def current_commit() -> str | None:
    """The repository's HEAD commit (short), or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def summarise_arms(per_seed: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, Any]]:
    """{arm: {metric: [value per seed]}} → {arm: {"per_seed": ..., "summary": {metric: spread(values)}}}."""
    return {arm: {"per_seed": metrics, "summary": {name: spread(values) for name, values in metrics.items()}}
            for arm, metrics in per_seed.items()}


def rounded(value: Any) -> Any:
    """``value`` with every float rounded to 6 significant digits (small, readable JSON)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def write_result(results_dir: Path, claim: str, *, title: str, claim_text: str, command: str, smoke: bool,
                 setup: dict[str, Any], metrics: dict[str, str], per_seed: dict[str, dict[str, list[float]]],
                 outcome: str, started: float, curves: dict[str, Any] | None = None,
                 arm_seeds: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """Write ``results_dir/<claim>.json`` (schema in the module docstring) and return it.

    ``metrics`` maps each metric's key to its column label in the results table (an arm may lack some: "–" in the
    table); ``per_seed[arm][metric]`` holds one value per seed of ``setup["seeds"]``, or of ``arm_seeds[arm]`` for
    arms run over other seeds; ``setup`` must name at least model, data, steps, learning_rate and seeds.
    """
    missing = [key for key in ("model", "data", "steps", "learning_rate", "seeds") if key not in setup]
    if missing:
        raise ValueError(f"write_result({claim!r}): setup lacks {missing}")
    arm_seeds = arm_seeds or {}
    for arm, values in per_seed.items():
        unknown = set(values) - set(metrics)
        if unknown:
            raise ValueError(f"write_result({claim!r}): arm {arm!r} has metrics {sorted(unknown)} not in {list(metrics)}")
        seeds = arm_seeds.get(arm, setup["seeds"])
        lengths = {name: len(v) for name, v in values.items()}
        if any(n != len(seeds) for n in lengths.values()):
            raise ValueError(f"write_result({claim!r}): arm {arm!r} needs one value per seed {seeds}, got {lengths}")
    arms = summarise_arms(per_seed)
    for arm, seeds in arm_seeds.items():
        arms[arm]["seeds"] = seeds
    result = rounded({"claim": claim, "title": title, "claim_text": claim_text, "command": command, "smoke": smoke,
                       "setup": setup, "metrics": metrics, "arms": arms, "curves": curves or {}, "outcome": outcome,
                       "seconds": round(time.time() - started, 1), "commit": current_commit()})
    path = results_dir / f"{claim}.json"
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {path}")
    return result


def new_figure(ncols: int = 1):
    """A small matplotlib figure (Agg backend) with ``ncols`` axes side by side: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.3), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig, results_dir: Path, claim: str) -> Path:
    """Save ``fig`` as ``results_dir/<claim>.png`` (small: 90 dpi) and close it."""
    import matplotlib.pyplot as plt

    path = results_dir / f"{claim}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_curves(ax, curves: dict[str, dict[str, list]], key: str, ylabel: str) -> None:
    """Mean over seeds of curve ``key`` per arm against its "steps", with the min–max band shaded.

    ``curves[arm]`` = {"steps": [...], key: [[value per step] per seed]}.
    """
    for arm, curve in curves.items():
        runs = curve[key]
        mean = [statistics.fmean(v) for v in zip(*runs)]
        line, = ax.plot(curve["steps"], mean, marker="o", markersize=3, label=arm)
        if len(runs) > 1:
            ax.fill_between(curve["steps"], [min(v) for v in zip(*runs)], [max(v) for v in zip(*runs)],
                            color=line.get_color(), alpha=0.2)
    ax.set(xlabel="optimizer step", ylabel=ylabel)
    ax.legend(fontsize=7)
