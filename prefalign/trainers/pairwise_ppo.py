"""Pairwise PPO (Pairwise-RL, docs/methods/pairwise_rl.md, arXiv:2504.04950): GRPOTrainer with the pairwise RM's probability of
beating an anchor as the reward.

TRL 1.16 has no PPO trainer; GRPOTrainer has the rest of what the method needs: sampling, the clipped surrogate
(`epsilon`), the per-token KL to the reference (`beta`, the k3 estimator in the loss rather than in the reward) and
their logging (`kl`, `clip_ratio/*`). How this subclass hooks in, smallest first:

- The reward is a TRL reward function (`rewards/pairwise_rm/*` in the logs): for each sampled completion y the
  position-consistent r(y) = ½·[P(y ≻ y*) + 1 − P(y* ≻ y)] against its prompt's anchor y* (2 RM contexts per
  completion), or, with `advantage="round_robin"`, the mean of r(y_i vs y_j) over the other completions of the same
  prompt (K·(K−1)/2 pairs per prompt, 2 contexts each: K − 1 per completion). Also logged: `pairwise/win_rate`, the
  fraction of completions with r > ½ against the anchor (not in round-robin mode, which has no anchor).
- `_calculate_rewards` keeps the gathered rewards; `_generate_and_score_completions` replaces TRL's group-normalised
  advantages by r − ½ for `anchor` (the anchor is the baseline) and `round_robin` (there the group mean is exactly ½,
  so r − ½ is also the group-centred reward). `group` leaves GRPO's (r − mean)/std advantage (`scale_rewards`) as is.

Anchors: a data set column with a reference answer (`anchor_column`), or, by default, the greedy answer of the
reference policy (the model as given, before training) to every prompt, generated once before training (shared out
across processes) and kept in the data set's `reference_anchor` column for every epoch.

Images: prompts with an `images` (or `image`) column, or a `video` column of frames (one image per frame), go to the
policy through TRL's GRPO vision support and, with each completion, to the pairwise RM (`PairwiseRewardModel` with
``images``: the prompt's images in both orders); greedy reference anchors are generated with them too.

Left out: the paper's learned value baseline with GAE. A critic would need its own model, optimizer and distributed
wrapping next to TRL's loop, and the paper's critic conditioning is not public (docs/methods/pairwise_rl.md). With a sequence-level
reward and no critic, GAE with γ = λ = 1 gives every token the sequence advantage, which is what GRPO's loss uses.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import GRPOConfig, GRPOTrainer

from prefalign.data import images_per_row, video_frames_as_images
from prefalign.generation import generate
from prefalign.judges.pairwise import PairwiseRewardModel
from prefalign.losses import round_robin_rewards
from prefalign.messages import conversation_text
from prefalign.trainers import papers
from prefalign.trainers.inherited import refuse_unhonoured_fields

logger = logging.getLogger("prefalign.trainers.pairwise_ppo")

ADVANTAGES = ("anchor", "group", "round_robin")
GENERATED_ANCHOR_COLUMN = "reference_anchor"
# GRPOConfig fields read only by GRPO's advantage computation, which "anchor" and "round_robin" replace.
GROUP_ADVANTAGE_FIELDS = ("scale_rewards", "reward_weights", "multi_objective_aggregation")


@dataclass
class PairwisePPOConfig(GRPOConfig):
    r"""Configuration for [`PairwisePPOTrainer`]: every [`~trl.GRPOConfig`] field, plus the ones below.

    Parameters that control the reward and the advantage (docs/methods/pairwise_rl.md; the paper's exact centring and anchor
    choice are not public, so both are options):
        advantage (`str`, defaults to `"anchor"`): `"anchor"`: r − ½, the anchor as baseline (r = ½ ties it);
            `"group"`: GRPO's group normalisation of r (honours `scale_rewards`); `"round_robin"`: no anchor, each
            completion's mean win probability against the other completions of its prompt, minus ½.
        anchor_column (`str` or `None`, defaults to `None`): data set column holding each prompt's reference answer
            (string or assistant messages, e.g. `"chosen"`). `None`: greedy answers of the reference policy.
        anchor_max_new_tokens (`int` or `None`, defaults to `None`): longest generated anchor; `None` uses
            `max_completion_length`, so anchors and samples have the same budget.
        anchor_generation_batch_size (`int`, defaults to `8`): prompts per `generate` call for the anchors.
        anchor_keep_truncated (`bool`, defaults to `False`): keep prompts whose greedy reference anchor was cut off at
            its token limit (no end token). By default they are dropped from the data set and counted in the log.
        reward_batch_size (`int`, defaults to `8`): RM contexts per forward when scoring completions.

    Changed defaults:
        beta (`float`, defaults to `0.05`): per-token KL coefficient to the reference (GRPO's default 0 would drop
            the KL penalty of the method).

    Inherited settings (every [`~trl.GRPOConfig`] field that changes GRPOTrainer's loss or training objective):
        honoured (GRPOTrainer's own loss runs unchanged on this trainer's advantages): `beta`, `epsilon`,
            `epsilon_high`, `delta`, `loss_type`, `importance_sampling_level`, `num_iterations`,
            `mask_truncated_completions`, `top_entropy_quantile`, the entropy bonus (`entropy_coef` and the
            adaptive settings), `sapo_*`, `vespo_*`, `off_policy_mask_threshold`, `use_bias_correction_kl`,
            `vllm_importance_sampling_*`, `router_aux_loss_coef`, `cast_lm_head_to_fp32`, `sync_ref_model` and its
            settings, and the sampling settings (`num_generations`, `temperature`, `top_p`, `top_k`, `min_p`,
            `repetition_penalty`, `max_completion_length`, `generation_kwargs`). With `advantage="group"` also
            `scale_rewards`, `reward_weights` and `multi_objective_aggregation` (GRPO's advantage is kept).
        refused at start with `advantage="anchor"` or `"round_robin"`, when not at their defaults: `scale_rewards`,
            `reward_weights` and `multi_objective_aggregation` (those modes replace GRPO's advantage by r − ½).
            See docs/methods/pairwise_rl.md.
    """

    advantage: str = field(default="anchor", metadata={"help": "anchor (r − ½), group (GRPO) or round_robin."})
    anchor_column: str | None = field(
        default=None, metadata={"help": "Column with the reference answer; None: greedy answers of the reference."})
    anchor_max_new_tokens: int | None = field(
        default=None, metadata={"help": "Longest generated anchor; None: max_completion_length."})
    anchor_generation_batch_size: int = field(default=8, metadata={"help": "Prompts per anchor generate call."})
    anchor_keep_truncated: bool = field(
        default=False, metadata={"help": "Keep prompts whose reference anchor was cut off (default: drop, counted)."})
    reward_batch_size: int = field(default=8, metadata={"help": "Pairwise RM contexts per forward."})
    beta: float = field(default=0.05, metadata={"help": "Per-token KL coefficient to the reference policy."})

    def __post_init__(self):
        super().__post_init__()
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"PairwisePPOConfig: advantage={self.advantage!r}; expected one of {ADVANTAGES}")
        if self.chat_template_kwargs and self.anchor_column is None and self.advantage != "round_robin":
            raise ValueError(f"chat_template_kwargs={self.chat_template_kwargs!r}: the greedy reference anchors are "
                             "generated without them while GRPO renders the policy's prompts with them, so the RM "
                             "would compare answers to different prompts; give the anchors in a column "
                             "(anchor_column) or leave chat_template_kwargs unset")
        refuse_unhonoured_fields(self, GRPOConfig, ("label_smoothing_factor",), "PairwisePPOTrainer",
                                 "transformers' label smoother never runs in a policy-gradient loss.")
        if self.advantage != "group":
            refuse_unhonoured_fields(self, GRPOConfig, GROUP_ADVANTAGE_FIELDS,
                                     f"PairwisePPOTrainer (advantage={self.advantage!r})",
                                     "They shape GRPO's group advantage, which this mode replaces by r − ½; use "
                                     "advantage='group' for them (docs/methods/pairwise_rl.md).")


class PairwisePPOTrainer(GRPOTrainer):
    """GRPOTrainer whose reward is a pairwise generative RM's position-consistent win probability (docs/methods/pairwise_rl.md)."""

    _name = "PairwisePPO"
    _paper = papers.PAIRWISE_RL

    def __init__(self, model: Any, reward_model: PairwiseRewardModel, args: PairwisePPOConfig,
                 train_dataset: Dataset | None = None, eval_dataset: Dataset | None = None,
                 processing_class: Any = None, peft_config: Any = None, callbacks: list | None = None,
                 optimizers: tuple = (None, None)):
        if not isinstance(args, PairwisePPOConfig):
            raise TypeError(f"PairwisePPOTrainer needs a PairwisePPOConfig, got {type(args).__name__}")
        self.reward_model = reward_model
        reward_model.batch_size = args.reward_batch_size
        train_dataset, eval_dataset = (
            video_frames_as_images(d) if isinstance(d, Dataset) else
            {k: video_frames_as_images(v) for k, v in d.items()} if isinstance(d, dict) else d
            for d in (train_dataset, eval_dataset))
        self._anchor_column = None
        if args.advantage != "round_robin":
            if args.anchor_column is None:
                if is_deepspeed_zero3_enabled():
                    raise ValueError("PairwisePPOTrainer: under DeepSpeed ZeRO-3 the policy is partitioned from the "
                                     "start and cannot generate the reference anchors before training: set "
                                     "anchor_column (e.g. 'chosen') or advantage='round_robin'")
                self._anchor_column = GENERATED_ANCHOR_COLUMN
                train_dataset = self._with_reference_anchors(model, processing_class, train_dataset, args, "train")
                if isinstance(eval_dataset, Dataset):
                    eval_dataset = self._with_reference_anchors(model, processing_class, eval_dataset, args, "eval")
            else:
                self._anchor_column = args.anchor_column
                for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
                    if isinstance(dataset, Dataset):
                        _check_anchors(dataset, args.anchor_column, name)

        def pairwise_rm(prompts: list, completions: list, log_metric=None, **columns: Any) -> list[float]:
            return self._pairwise_rewards(prompts, completions, columns, log_metric)

        super().__init__(model, reward_funcs=[pairwise_rm], args=args, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, peft_config=peft_config,
                         callbacks=callbacks, optimizers=optimizers)
        reward_model.model.to(self.accelerator.device)
        self._gathered_rewards: torch.Tensor | None = None

    @staticmethod
    def _with_reference_anchors(model: Any, processing_class: Any, dataset: Dataset, args: PairwisePPOConfig,
                                split: str) -> Dataset:
        """``dataset`` with the reference policy's greedy answer to each prompt in ``reference_anchor``."""
        if processing_class is None and not isinstance(model, str):
            raise ValueError("PairwisePPOTrainer: pass processing_class to generate the reference anchors")
        state = PartialState()
        if not isinstance(model, str):
            model = model.to(state.device)  # generate on this process's accelerator, not the CPU
        prompts = dataset["prompt"]
        limit = args.anchor_max_new_tokens or args.max_completion_length
        with state.split_between_processes(list(range(len(prompts))), apply_padding=True) as mine:
            images = images_per_row(dataset.select(mine))
            answers, finished = generate(model, processing_class, [prompts[i] for i in mine], do_sample=False,
                                         images=images,
                                         max_new_tokens=limit, batch_size=args.anchor_generation_batch_size,
                                         progress=state.is_local_main_process, return_finished=True,
                                         desc=f"Greedy reference anchors ({split})")
        indexed = dict(gather_object([(i, (texts[0], ended[0])) for i, texts, ended in zip(mine, answers, finished)]))
        anchors = [indexed[i][0] for i in range(len(prompts))]
        cut = [i for i in range(len(prompts)) if not indexed[i][1]]
        if cut and not args.anchor_keep_truncated:
            logger.warning("dropped %d of %d %s prompts whose greedy reference anchor was cut off at %d tokens "
                           "(anchor_keep_truncated=True keeps them)", len(cut), len(prompts), split, limit)
            if len(cut) == len(prompts):
                raise ValueError(f"PairwisePPOTrainer: every {split} reference anchor was cut off at {limit} tokens; "
                                 "raise anchor_max_new_tokens or set anchor_keep_truncated=True")
            keep = [i for i in range(len(prompts)) if indexed[i][1]]
            dataset, anchors = dataset.select(keep), [anchors[i] for i in keep]
        elif cut:
            logger.warning("kept %d of %d %s reference anchors cut off at %d tokens (anchor_keep_truncated)",
                           len(cut), len(prompts), split, limit)
        empty = sum(not a for a in anchors)
        if empty:
            logger.warning("%d of %d greedy reference anchors (%s) are empty; they are kept", empty, len(anchors), split)
        logger.info("generated %d greedy reference anchors for the %s prompts", len(anchors), split)
        if GENERATED_ANCHOR_COLUMN in dataset.column_names:
            dataset = dataset.remove_columns(GENERATED_ANCHOR_COLUMN)
        return dataset.add_column(GENERATED_ANCHOR_COLUMN, anchors)

    def _pairwise_rewards(self, prompts: list, completions: list, columns: dict, log_metric) -> list[float]:
        """The reward function TRL calls with this process's completions (prompts repeated K times)."""
        if self.args.advantage == "round_robin":
            return self._round_robin_rewards(prompts, completions, images_per_row(columns)).tolist()
        if self._anchor_column not in columns:
            raise KeyError(f"PairwisePPOTrainer: anchor column {self._anchor_column!r} did not reach the reward; "
                           f"columns: {sorted(columns)}")
        rewards = self.reward_model.reward(prompts, completions, columns[self._anchor_column],
                                           images=images_per_row(columns))
        if log_metric is not None:
            log_metric("pairwise/win_rate", float((rewards > 0.5).float().mean()))
        return rewards.tolist()

    def _round_robin_rewards(self, prompts: list, completions: list, images: list | None = None) -> torch.Tensor:
        """Round-robin rewards of this process's completions; groups may span processes, so pairs are shared out."""
        k = self.num_generations if self.model.training else self.num_generations_eval
        all_prompts, all_completions = gather_object(list(prompts)), gather_object(list(completions))
        all_images = None if images is None else gather_object(list(images))
        if len(all_completions) % k:
            raise ValueError(f"round_robin: {len(all_completions)} completions are not whole groups of {k}")
        pairs = [(g * k + i, g * k + j) for g in range(len(all_completions) // k)
                 for i, j in itertools.combinations(range(k), 2)]
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = list(range(rank, len(pairs), world))
        scores = self.reward_model.reward([all_prompts[pairs[p][0]] for p in mine],
                                          [all_completions[pairs[p][0]] for p in mine],
                                          [all_completions[pairs[p][1]] for p in mine],
                                          images=None if all_images is None else
                                          [all_images[pairs[p][0]] for p in mine]) if mine else torch.empty(0)
        pair_rewards = torch.empty(len(pairs))
        for p, score in gather_object(list(zip(mine, scores.tolist()))):
            pair_rewards[p] = score
        rewards = round_robin_rewards(pair_rewards.view(-1, k * (k - 1) // 2), k).flatten()
        return rewards[rank * len(prompts) : (rank + 1) * len(prompts)]

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        """TRL's rewards (gathered over processes), kept for the advantage."""
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._gathered_rewards = rewards_per_func[:, 0]
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        """TRL's rollout; then, for `anchor` and `round_robin`, the advantage r − ½ (docs/methods/pairwise_rl.md)."""
        output = super()._generate_and_score_completions(inputs)
        if self.args.advantage == "group":
            return output
        advantages = torch.nan_to_num(self._gathered_rewards - 0.5, nan=0.0)
        n = output["advantages"].shape[0]
        rank = self.accelerator.process_index
        output["advantages"] = advantages[rank * n : (rank + 1) * n].to(output["advantages"].dtype)
        for _ in range(len(advantages)):  # the completions table shows the advantages actually used
            self._logs["advantages"].pop()
        self._logs["advantages"].extend(advantages.tolist())
        return output


def _check_anchors(dataset: Dataset, column: str, name: str) -> None:
    """Raise, naming rows, unless every row has a non-empty anchor in ``column``."""
    if column not in dataset.column_names:
        raise ValueError(f"{name}: anchor column {column!r} not found (present: {dataset.column_names}); set "
                         "anchor_column to the reference-answer column, or to None for greedy reference anchors")
    empty = [row for row, value in enumerate(dataset[column]) if not conversation_text(value).strip()]
    if empty:
        raise ValueError(f"{name}: {len(empty)} row(s) with an empty anchor in column {column!r}: rows {empty[:10]}")
