"""Regenerate the claim-experiments section of docs/results.md from benchmarks/experiments/results/*.json.

    python benchmarks/experiments/report.py            # run by `make experiments` after the experiments

The section lies between the markers `<!-- experiments:begin -->` and `<!-- experiments:end -->` (everything else
on the page is left alone). For each claim: a table (one row per arm; each cell the mean over seeds, the min–max
over seeds and the half-width of the 95% t-interval of the mean), the plot, the setup and the command; a claim
whose JSON is missing (or holds only a --smoke run) says "not yet run", one without a script says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS_DIR  # noqa: E402

PAGE = REPO / "docs" / "results.md"
BEGIN, END = "<!-- experiments:begin -->", "<!-- experiments:end -->"
# Every claim of the evidence plan, in the page's order: (claim = script and JSON name, title, claim, script exists).
CLAIMS = [
    ("wintie", "Win-tie vs Bradley–Terry reward models (SoliReward)",
     "win-tie keeps good items tied (lower spread of good rewards relative to the good–bad gap) at equal or better "
     "cross-prompt AUC", True),
    ("delta", "Delta learning extrapolates (delta DPO vs SFT)",
     "from a model that writes about k bullets, delta DPO on \"k+1 over k\" pushes the mean count past k+1 while SFT "
     "on the k+1 answers stays at or below k+1", True),
    ("entanglement", "Gradient entanglement on high-overlap pairs (DPO vs pngd / token_mask / anchored)",
     "DPO lowers log π(y_w) while the probe reports ⟨g_w,g_l⟩ ≥ ‖g_w‖²; the disentangled modes keep log π(y_w) from "
     "falling", True),
    ("noisy_pairs", "Noisy preference pairs (DBPM, PLD, audit, MW loss)",
     "at 20% flips, flagged-flip F1 ≥ 0.8 and held-out accuracy within 2 points of clean data, ahead of label "
     "smoothing and the robust loss; MW loss ≥ BT in AUC", True),
    ("rrpo", "RRPO's α-frontier vs DPO's β's",
     "RRPO's points dominate DPO's: equal or better phrase accuracy at lower KL(π_ref‖π_θ) on the chosen answers",
     True),
    ("pairwise_rl", "Pairwise-RL: pairwise RM and pairwise PPO vs a scalar RM and GRPO",
     "the pairwise RM is more position-consistent and the pairwise policy wins at least as often", True),
    ("trustjudge", "TrustJudge consistency",
     "fewer score-comparison and transitivity inconsistencies at equal or better agreement, tie rates reported",
     True),
    ("d2o", "D²O trade-off",
     "D²O lowers held-out negatives with less loss of the good answers than DPO or unlikelihood", True),
]


# Rough cost of each script's default run on the project's shared 2-core CPU machine: a MiniLM reward run measured
# ≈ 2 CPU-minutes; SmolLM2 LoRA steps estimated from earlier runs here (≈ 5–10 s for 2–4 pairs, docs/results.md).
COSTS = {
    "wintie": "≈ 2 CPU-minutes per run, 15 runs (5 seeds × 3 arms): about 30 CPU-minutes, 1–1.5 h wall on the "
              "shared machine",
    "delta": "per seed: 40 warm-start + 2 × 60 LoRA steps on SmolLM2 and 14 greedy passes over 24 prompts: about "
             "30 min; 3 seeds ≈ 1.5–2 h",
    "entanglement": "per seed: 4 modes × 60 LoRA steps on SmolLM2 with held-out and probe checks every 10 steps: "
                    "measured ≈ 34 min on one core; 3 seeds ≈ 1.7 h, or about 1.1 h split over 2 cores "
                    "(`--seeds 0 1` and `--seeds 2`, then merge.py)",
    "rrpo": "per seed: 7 arms × 20 LoRA steps on SmolLM2 plus 50 held-out pairs each: measured ≈ 35 min on one core; "
            "3 seeds ≈ 1.8 h, or about 1.2 h split over 2 cores",
    "pairwise_rl": "per seed: 2 RM runs of 40 LoRA steps (batch 8) and 2 policy runs of 24 steps × 8 samples of 48 "
                   "tokens on SmolLM2, plus generation and MiniLM judging: measured ≈ 75 min per seed with 2–3 "
                   "processes sharing the 2 cores (pairwise RM 14–21 min, scalar RM 7–10 min, pairwise PPO 17–23 min, "
                   "GRPO 10–16 min); 3 seeds ≈ 2 h split over 2 cores",
    "trustjudge": "per seed: the 135M judge reads 250 responses on two scales and 500 pairs in both orders: measured "
                  "≈ 19 CPU-minutes; 3 seeds ≈ 1 h on one core",
    "d2o": "per seed: 16 LoRA steps (batch 2) of D²O K=4 (≈ 20 s a step), DPO (≈ 5 s) and unlikelihood (≈ 2 s) on "
           "SmolLM2, 12 held-out evaluations (≈ 20 s each) and 4 anchors for 32 prompts (≈ 100 s): measured ≈ 13 min "
           "on one core; 3 seeds ≈ 40 min",
    "noisy_pairs": "days of CPU (see docs/methods/noisy_pairs.md): a GPU job; one cell with `--flip-rates 0.2 "
                   "--train-samples 200` is hours",
}


def _number(value: float) -> str:
    """A number with 3 significant decimals, compact."""
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"


def _escaped(text: str) -> str:
    """``text`` safe inside a markdown table cell (a bare "|" would split the cell)."""
    return text.replace("|", "\\|")


def cell(summary: dict) -> str:
    """One table cell: mean, [min–max] over seeds and ± the 95% t-interval's half-width (absent for one seed)."""
    text = f"{_number(summary['mean'])} [{_number(summary['min'])}–{_number(summary['max'])}]"
    if summary["ci95"] is not None:
        text += f" ±{_number((summary['ci95'][1] - summary['ci95'][0]) / 2)}"
    return text


def claim_section(claim: str, title: str, claim_text: str, has_script: bool, results_dir: Path,
                  page_dir: Path = PAGE.parent) -> str:
    """The markdown of one claim: table, plot, setup and command, or what is missing."""
    lines = [f"### {title}", "", f"Claim: {claim_text}.", ""]
    path = results_dir / f"{claim}.json"
    result = json.loads(path.read_text()) if path.is_file() else None
    if not has_script:
        return "\n".join(lines + ["**No experiment script yet**: not run.", ""])
    command = f"`make experiments CLAIM={claim}` (= `nice -n 19 python benchmarks/experiments/{claim}.py`)"
    if result is None or result.get("smoke"):
        return "\n".join(lines + [f"**Not yet run.** Command: {command}. Cost: {COSTS.get(claim, 'unknown')}.", ""])
    lines[2] = f"Claim: {result['claim_text']}."  # the script's own wording
    setup = result["setup"]
    metrics = result["metrics"]
    lines += [f"Outcome: **{result['outcome']}**", "",
              "| arm | " + " | ".join(map(_escaped, metrics.values())) + " |", "|---" * (len(metrics) + 1) + "|"]
    for arm, data in result["arms"].items():
        lines.append(f"| {_escaped(arm)} | " + " | ".join(cell(data["summary"][key]) if key in data["summary"] else "–"
                                                for key in metrics) + " |")
    extra = ", ".join(f"{key} {value}" for key, value in setup.items()
                      if key not in ("model", "data", "steps", "learning_rate", "seeds"))
    png = results_dir / f"{claim}.png"
    training = (f"{setup['steps']} steps; learning rate {setup['learning_rate']:g}" if setup["steps"] else
                "no training")
    lines += ["", f"Setup: model {setup['model']}; data {setup['data']}; {training}; seeds "
              f"{', '.join(map(str, setup['seeds']))}"
              + (f"; {extra}" if extra else "") + f". Run in {result['seconds'] / 60:.0f} min at commit "
              f"`{result['commit']}`. Command: {command}.", ""]
    if png.is_file():
        lines += [f"![{title}]({os.path.relpath(png, page_dir)})", ""]
    return "\n".join(lines)


def experiments_section(results_dir: Path = RESULTS_DIR, page_dir: Path = PAGE.parent) -> str:
    """The whole generated section (between the markers, markers included)."""
    status = []
    for claim, title, _, has_script in CLAIMS:
        path = results_dir / f"{claim}.json"
        result = json.loads(path.read_text()) if path.is_file() else None
        state = ("no script yet" if not has_script else "not yet run" if result is None or result.get("smoke")
                 else result["outcome"])
        status.append(f"| {title} | {_escaped(state)} |")
    unmergeable = [claim for claim, _, _, has_script in CLAIMS
                   if has_script and "def outcome_of(" not in (RESULTS_DIR.parent / f"{claim}.py").read_text()]
    parts = [BEGIN, "## Claim experiments (seeds, spread, plots)", "",
             "Generated by `python benchmarks/experiments/report.py` from `benchmarks/experiments/results/*.json`; "
             "`make experiments` reruns everything (hours on 2 CPU cores), `make experiments CLAIM=<name>` one claim; a long "
             "run can be split by seeds (`--seeds 3 4 --results-dir <part>`) and joined with "
             "`python benchmarks/experiments/merge.py <result.json> <part>/<claim>.json`"
             + (f" ({', '.join(unmergeable)} cannot be merged yet: merge.py refuses them)" if unmergeable else "")
             + ". "
             "Each table cell is the mean over seeds, [min–max] over seeds, and ± the half-width of the 95% "
             "t-interval of the mean.", "", "| claim | outcome |", "|---|---|", *status, ""]
    parts += [claim_section(*entry, results_dir, page_dir) for entry in CLAIMS]
    parts.append(END)
    return "\n".join(parts)


def update_page(page: Path = PAGE, results_dir: Path = RESULTS_DIR) -> str:
    """Replace the section between the markers of ``page`` (appended at the end when absent); returns the page."""
    text = page.read_text() if page.is_file() else "# Results\n"
    section = experiments_section(results_dir, page.parent)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    page.write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    opts = parser.parse_args(argv)
    update_page(opts.page, opts.results_dir)
    print(f"updated {opts.page}")


if __name__ == "__main__":
    main()
