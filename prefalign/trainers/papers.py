"""The paper each prefalign trainer implements, in the form TRL's trainers carry it (``_paper``: title, arXiv id,
BibTeX citation), so that the model card TRL writes next to a trained model cites it.

The BibTeX entries name the arXiv record (title, eprint, year); author lists are left to the arXiv page.
"""

from __future__ import annotations


def arxiv_paper(title: str, arxiv_id: str, key: str) -> dict[str, str]:
    """TRL's ``_paper`` dict for an arXiv paper: ``title``, ``id`` and a ``citation`` BibTeX ``@misc`` entry."""
    year = 2000 + int(arxiv_id[:2])
    citation = (f"@misc{{{key},\n    title        = {{{{{title}}}}},\n    year         = {year},\n"
                f"    eprint       = {{{arxiv_id}}},\n    archivePrefix = {{arXiv}},\n"
                f"    url          = {{https://arxiv.org/abs/{arxiv_id}}},\n}}")
    return {"title": title, "id": arxiv_id, "citation": citation}


RRPO = arxiv_paper("Self-alignment of Large Video Language Models with Refined Regularized Preference Optimization",
                   "2504.12083", "sarkar2025rrpo")
D2O = arxiv_paper("Negating Negatives: Alignment with Human Negative Samples via Distributional Dispreference "
                  "Optimization", "2403.03419", "duan2024d2o")
GRADIENT_ENTANGLEMENT = arxiv_paper("A Common Pitfall of Margin-based Language Model Alignment: Gradient "
                                    "Entanglement", "2410.13828", "yuan2024entanglement")
SOLIREWARD = arxiv_paper("SoliReward: Mitigating Susceptibility to Reward Hacking and Annotation Noise in Video "
                         "Generation Reward Models", "2512.22170", "solireward2025")
PAIRWISE_RL = arxiv_paper("A Unified Pairwise Framework for RLHF: Bridging Generative Reward Modeling and Policy "
                          "Optimization", "2504.04950", "pairwiserl2025")
DELTA_LEARNING = arxiv_paper("The Delta Learning Hypothesis: Preference Tuning on Weak Data can Yield Strong Gains",
                             "2507.06187", "geng2025delta")
