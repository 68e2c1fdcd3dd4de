"""prefalign: preference-alignment post-training for LLMs and VLMs on top of TRL.

    from prefalign import RRPOConfig, RRPOTrainer, TrustJudge

The names below are imported on first use, so ``import prefalign`` stays light (TRL and transformers load only when
a trainer, the judge or a loader is asked for).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "PackedDPOConfig": "prefalign.trainers.dpo",
    "PackedDPOTrainer": "prefalign.trainers.dpo",
    "RRPOConfig": "prefalign.trainers.rrpo",
    "RRPOTrainer": "prefalign.trainers.rrpo",
    "D2OConfig": "prefalign.trainers.d2o",
    "D2OTrainer": "prefalign.trainers.d2o",
    "DisentangledDPOConfig": "prefalign.trainers.disentangled",
    "DisentangledDPOTrainer": "prefalign.trainers.disentangled",
    "WinTieRewardConfig": "prefalign.trainers.reward_wintie",
    "WinTieRewardTrainer": "prefalign.trainers.reward_wintie",
    "PairwiseRMConfig": "prefalign.trainers.pairwise_rm",
    "PairwiseRMTrainer": "prefalign.trainers.pairwise_rm",
    "PairwiseRewardModel": "prefalign.judges.pairwise",
    "PairwisePPOConfig": "prefalign.trainers.pairwise_ppo",
    "PairwisePPOTrainer": "prefalign.trainers.pairwise_ppo",
    "GradientEntanglementCallback": "prefalign.diagnostics",
    "TrustJudge": "prefalign.judges.judge",
    "JudgeReward": "prefalign.judges.rewards",
    "load_model": "prefalign.models",
    "load_processing_class": "prefalign.models",
    "load_reward_model": "prefalign.reward_models",
    "load_preference_dataset": "prefalign.data",
    "validate_preference_dataset": "prefalign.data",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    """Import an exported name from its module on first access."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prefalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

