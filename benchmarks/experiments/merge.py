"""Merge result JSONs of one claim run over different seeds into one, so a long experiment can be split across
sessions or machines (each part run with its own `--seeds` and `--results-dir`).

    python benchmarks/experiments/merge.py benchmarks/experiments/results/wintie.json /tmp/part/wintie.json

The parts must agree on everything but the seeds (same claim, setup, arms and metric keys; no seed twice; the
first part's metric labels are kept). Per-seed
values and curves are concatenated in the order given, the summaries recomputed, the outcome recomputed by the
claim script's `outcome_of(per_seed, setup)`, the plot redrawn, and the merged JSON written over the first file.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import rounded, summarise_arms  # noqa: E402


def _merged_curves(a: Any, b: Any, where: str = "curves") -> Any:
    """Curves of two parts: dicts key by key, "steps" lists must be equal, other lists (one entry per seed) joined."""
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    if not (isinstance(a, dict) and isinstance(b, dict)) or set(a) != set(b):
        raise ValueError(f"{where}: the parts' curves differ in shape")
    merged = {}
    for key in a:
        if key == "steps":
            if a[key] != b[key]:
                raise ValueError(f"{where}.steps: the parts were measured at different steps")
            merged[key] = a[key]
        else:
            merged[key] = _merged_curves(a[key], b[key], f"{where}.{key}")
    return merged


def merge_results(parts: list[dict[str, Any]], outcome_of) -> dict[str, Any]:
    """One result from ``parts`` run over disjoint seeds (module docstring); ``outcome_of(per_seed, setup)``."""
    first = parts[0]
    seeds: list[int] = []
    for part in parts:
        if part["claim"] != first["claim"] or list(part["metrics"]) != list(first["metrics"]):
            raise ValueError(f"the parts differ in claim or metrics: {first['claim']} {list(first['metrics'])} vs "
                             f"{part['claim']} {list(part['metrics'])}")
        other = {k: v for k, v in part["setup"].items() if k != "seeds"}
        if other != {k: v for k, v in first["setup"].items() if k != "seeds"}:
            raise ValueError(f"the parts' setups differ beyond the seeds: {first['setup']} vs {part['setup']}")
        if part.get("smoke") or list(part["arms"]) != list(first["arms"]):
            raise ValueError("the parts must be full runs with the same arms")
        if any("seeds" in data for data in part["arms"].values()):
            raise ValueError("parts with arm-specific seeds cannot be merged")
        if set(seeds) & set(part["setup"]["seeds"]):
            raise ValueError(f"seed(s) {sorted(set(seeds) & set(part['setup']['seeds']))} appear in two parts")
        seeds += part["setup"]["seeds"]
    per_seed = {arm: {metric: [v for part in parts for v in part["arms"][arm]["per_seed"][metric]]
                      for metric in first["arms"][arm]["per_seed"]} for arm in first["arms"]}
    curves = first["curves"]
    for part in parts[1:]:
        curves = _merged_curves(curves, part["curves"])
    setup = {**first["setup"], "seeds": seeds}
    return rounded({**first, "setup": setup, "arms": summarise_arms(per_seed), "curves": curves,
                    "outcome": outcome_of(per_seed, setup), "seconds": sum(p["seconds"] for p in parts),
                    "commit": ", ".join(dict.fromkeys(str(p["commit"]) for p in parts))})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", type=Path, nargs="+", help="the result JSONs; the merged one replaces the first")
    opts = parser.parse_args(argv)
    parts = [json.loads(path.read_text()) for path in opts.files]
    script = runpy.run_path(str(Path(__file__).resolve().parent / f"{parts[0]['claim']}.py"))
    if "outcome_of" not in script:
        raise SystemExit(f"{parts[0]['claim']}.py has no outcome_of(per_seed, setup): its results cannot be merged yet")
    merged = merge_results(parts, script["outcome_of"])
    opts.files[0].write_text(json.dumps(merged, indent=1, ensure_ascii=False) + "\n")
    script["plot"](merged, opts.files[0].parent)
    print(f"merged {len(parts)} parts (seeds {merged['setup']['seeds']}) into {opts.files[0]}")
    return merged


if __name__ == "__main__":
    main()
