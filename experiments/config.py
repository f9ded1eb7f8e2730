"""The configs of ``klq train``: a task (:class:`TaskConfig`) on top of the trainer's config.

Plain Python like :mod:`klq_jax.config` (no JAX import): the command-line help, the presets and a
recorded ``config.json`` load fast. The docstrings are the command's help: plain text.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from klq_jax.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which models, prompts and reward an experiment uses.

    Attributes:
      kind: synthetic (a random or given policy, random prompts, a programmatic reward: tests and
        CPU runs), or one of the paper's tasks tldr, hh, imdb.
      policy: the initial policy (and π_b unless reference is set): a Hugging Face directory or
        hub name, a klq_jax checkpoint, or random:tiny.
      reference: the reference policy π_b (default: the initial policy).
      reward_model: a reward model (score head) source, for the reward-model tasks.
      critic: a separate value network initialised from this score-head model (reward_model: the
        task's reward model), TRL's layout; default None: a value head on the policy's body
        (the paper).
      reward: the programmatic reward of the synthetic task: target_token (fraction of response
        tokens equal to target_token), low_tokens (fraction of response tokens with ids below
        target_token: a dense reward that is easy to increase) or length (response length / T_max).
      target_token: the token the target_token reward likes.
      dataset: dataset hub name or local path (the task's default when None).
      dataset_subset: e.g. HH's helpful-base.
      split: dataset split for training prompts.
      eval_split: dataset split of the held-out validation prompts (see eval_every); None: the
        task's default (TL;DR validation, HH and IMDb test; the synthetic task draws a separate
        prompt set disjoint from the training prompts).
      max_prompt_len: prompt token budget (TL;DR: 512).
      tokenizer: tokenizer source (default: the policy's directory).
      reward_tokenizer: the reward model's tokenizer when it differs from the policy's (HH).
      reward_label: the class whose logit is the reward, for a classifier reward model (IMDb's
        DistilBERT: "POSITIVE", looked up in its config.label2id).
      prompt_length_range: IMDb's half-open range [lo, hi) of prompt lengths in tokens (the first
        k tokens of each review, k drawn per review; TRL: 2 8).
      dtype: compute dtype of every model (float32, bfloat16, float16).
      num_prompts: size of the synthetic prompt set.
      prompt_len: longest synthetic prompt.
      stop_token_id: the stop token (Pythia's EOS <|endoftext|> is 0).
      pad_token_id: the padding id for prompts/responses (synthetic: 0).
    """

    kind: Literal["synthetic", "tldr", "hh", "imdb"] = "synthetic"
    policy: str = "random:tiny"
    reference: str | None = None
    reward_model: str | None = None
    critic: str | None = None
    reward: Literal["target_token", "low_tokens", "length"] = "target_token"
    target_token: int = 7
    dataset: str | None = None
    dataset_subset: str | None = None
    split: str = "train"
    eval_split: str | None = None
    max_prompt_len: int = 512
    tokenizer: str | None = None
    reward_tokenizer: str | None = None
    reward_label: str = "POSITIVE"
    prompt_length_range: tuple[int, int] = (2, 8)
    dtype: str = "float32"
    num_prompts: int = 256
    prompt_len: int = 8
    stop_token_id: int = 0
    pad_token_id: int = 0

    def __post_init__(self):
        if self.kind not in ("synthetic", "tldr", "hh", "imdb"):
            raise ValueError(
                f"TaskConfig.kind={self.kind!r} is not one of 'synthetic', 'tldr', 'hh', 'imdb'"
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"TaskConfig.dtype={self.dtype!r} must be float32, bfloat16 or float16")
        for name in ("num_prompts", "prompt_len", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"TaskConfig.{name}={getattr(self, name)} must be >= 1")
        lo, hi = self.prompt_length_range
        if not 1 <= lo < hi:
            raise ValueError(
                f"TaskConfig.prompt_length_range={self.prompt_length_range} must be [lo, hi) with 1 <= lo < hi"
            )


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A whole run of klq train: the trainer's config plus its task.

    Attributes:
      task: models, prompts and reward.
    """

    task: TaskConfig = TaskConfig()
