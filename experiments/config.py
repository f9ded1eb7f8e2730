"""The configs of ``klq train``: a task (:class:`TaskConfig`) on top of the trainer's config.

Plain Python like :mod:`klq_jax.config` (no JAX import): the command-line help, the presets and a
recorded ``config.json`` load fast. The docstrings are the command's help: plain text.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from klq_jax.config import TrainConfig, range_problems
from klq_jax.errors import ConfigError


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
        task's reward model), TRL's layout; default None: the paper's layout, a value head on the
        policy's body.
      reward: the programmatic reward of the synthetic task: target_token (fraction of response
        tokens equal to target_token), low_tokens (fraction of response tokens with ids below
        target_token: a dense reward that is easy to increase) or length (response length / T_max).
      target_token: the token the target_token reward likes.
      dataset: dataset hub name or local path (the task's default when None).
      dataset_subset: e.g. HH's helpful-base (None, HH: helpful-base, except for a local directory
        without a helpful-base folder, whose own split files are read: a flat copy).
      split: dataset split for training prompts.
      eval_split: dataset split of the held-out validation prompts (see eval_every); None: the
        task's default (TL;DR validation, HH and IMDb test; the synthetic task draws a separate
        prompt set disjoint from the training prompts).
      max_prompt_len: prompt token budget (TL;DR: 512).
      hh_single_turn: HH: keep only prompts with exactly one Human turn (default); False keeps
        multi-turn conversations, the policy generating their final Assistant turn.
      tldr_source: TL;DR prompts from the pre-tokenised query_token ids (query_token; they must be
        left-padded with the tokenizer's pad id), re-encoded from subreddit/title/post with the
        policy's tokenizer (raw), or query_token when the dataset has it (auto).
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
    tldr_source: Literal["auto", "query_token", "raw"] = "auto"
    hh_single_turn: bool = True
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
        p = []
        if self.kind not in ("synthetic", "tldr", "hh", "imdb"):
            p.append(f"kind={self.kind!r} is not one of 'synthetic', 'tldr', 'hh', 'imdb'")
        if self.reward not in ("target_token", "low_tokens", "length"):
            p.append(f"reward={self.reward!r} is not one of 'target_token', 'low_tokens', 'length'")
        if self.tldr_source not in ("auto", "query_token", "raw"):
            p.append(f"tldr_source={self.tldr_source!r} is not one of 'auto', 'query_token', 'raw'")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            p.append(f"dtype={self.dtype!r} must be float32, bfloat16 or float16")
        for name in ("num_prompts", "prompt_len", "max_prompt_len"):
            p += range_problems(name, getattr(self, name), 1, integer=True)
        for name in ("stop_token_id", "pad_token_id"):
            p += range_problems(name, getattr(self, name), 0, integer=True)
        if self.reward == "low_tokens":  # it rewards the ids in [1, target_token): none below 2
            p += range_problems("target_token", self.target_token, 2, integer=True,
                                note="the low_tokens reward counts the ids in [1, target_token)")
        elif self.reward == "target_token":
            p += range_problems("target_token", self.target_token, 0, integer=True)
        lo, hi = self.prompt_length_range
        if not 1 <= lo < hi:
            p.append(f"prompt_length_range={self.prompt_length_range} must be [lo, hi) with 1 <= lo < hi")
        if p:
            raise ConfigError("Invalid TaskConfig: " + "; ".join(p))

    def vocabulary_problems(self, vocab_size: int) -> list[str]:
        """What of this task does not fit the policy's vocabulary of ``vocab_size`` ids (empty:
        nothing): the synthetic reward's target_token must be one of its ids (the stop and pad ids
        are the trainer's check, klq_jax.sampling.check_model_for_sampling)."""
        if self.kind != "synthetic" or self.reward == "length":
            return []
        if self.reward == "target_token" and self.target_token >= vocab_size:
            return [f"target_token={self.target_token} must be a token id of the policy, in "
                    f"[0, vocab_size={vocab_size}) (the target_token reward; set --task.target-token)"]
        if self.reward == "low_tokens" and self.target_token > vocab_size:  # ids below it: V means all
            return [f"target_token={self.target_token} must be at most vocab_size={vocab_size} (the "
                    "low_tokens reward counts the ids below it; set --task.target-token)"]
        return []


@dataclasses.dataclass(frozen=True)
class RunConfig(TrainConfig):
    """A whole run of klq train: the trainer's config plus its task.

    Attributes:
      task: models, prompts and reward.
    """

    task: TaskConfig = TaskConfig()
