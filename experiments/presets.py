"""Named run configurations: the paper's experiments and small CPU runs.

``klq train <preset> [--field value ...]`` starts one; ``--help`` after the preset
name lists every field. The paper's settings (Table 2): γ = 1, τ = 0.05, λ = 0.95, learning rate
1.41e-5 decayed linearly, 4 epochs per batch, 192 rollouts per batch in one minibatch of 192,
75k episodes, T_max = 53 on TL;DR. PPO's other settings come from TRL: clip 0.2, value clip 0.2,
value coefficient 0.1, sampling temperature 0.7, missing-EOS penalty ω = 1. As TRL's PPOv2 loop
(which the paper's fork ran): no gradient clipping (``max_grad_norm=None``; the library default
clips at 1.0), the learning rate decayed once per iteration (``lr_schedule_unit="iteration"``),
and PPO's advantages whitened per process, 48 rows of 192 on the paper's 4 GPUs
(``algo.whiten_groups=4``; 1 whitens the global batch).

Example::

    >>> from experiments import presets
    >>> cfg = presets.get("tldr-klq")
    >>> cfg.algo.name, cfg.algo.tau, cfg.rollouts_per_batch, cfg.max_new_tokens
    ('klq', 0.05, 192, 53)
"""

from __future__ import annotations

import dataclasses

from experiments.config import RunConfig, TaskConfig
from klq_jax.config import AlgoConfig, OptimConfig

# The paper's shared hyperparameters (Table 2) + TRL's PPO defaults.
_PAPER = dict(
    optim=OptimConfig(
        learning_rate=1.41e-5, schedule="linear", lr_schedule_unit="iteration", max_grad_norm=None
    ),
    rollouts_per_batch=192,
    minibatch_size=192,
    micro_batch_size=48,
    epochs=4,
    total_episodes=75_000,
    max_new_tokens=53,
    temperature=0.7,
    omega=1.0,
    score_micro_batch_size=48,
    save_every=25,
)

TLDR_TASK = TaskConfig(
    kind="tldr",
    policy="cleanrl/EleutherAI_pythia-1b-deduped__sft__tldr",
    reward_model="cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr",
    dataset="vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
    split="train",
    max_prompt_len=512,
    dtype="bfloat16",
)

HH_TASK = TaskConfig(
    kind="hh",
    policy="yongzx/pythia-1b-sft-hh",
    reward_model="Ray2333/gpt2-large-helpful-reward_model",
    dataset="Anthropic/hh-rlhf",
    dataset_subset="helpful-base",
    split="train",
    max_prompt_len=512,
    dtype="bfloat16",
)

# IMDb (paper Table 1): Llama-3.2-1B policy, DistilBERT sentiment reward (the POSITIVE logit),
# prompts = the first 2-7 tokens of each review of more than 200 characters, responses of at most
# 32 tokens (TRL's sentiment example), the paper's shared hyperparameters (Table 2).
IMDB_TASK = TaskConfig(
    kind="imdb",
    policy="meta-llama/Llama-3.2-1B",
    reward_model="lvwerra/distilbert-imdb",
    dataset="stanfordnlp/imdb",
    split="train",
    prompt_length_range=(2, 8),
    reward_label="POSITIVE",
    dtype="bfloat16",
)
_IMDB = dict(_PAPER, max_new_tokens=32)

# A tiny random policy and a programmatic reward that is easy to increase: runs in seconds on CPU.
TINY_TASK = TaskConfig(
    kind="synthetic", policy="random:tiny", reward="low_tokens", target_token=16, num_prompts=64
)
_TINY = dict(
    optim=OptimConfig(learning_rate=3e-3, schedule="constant"),
    rollouts_per_batch=16,
    minibatch_size=8,
    micro_batch_size=8,  # every batch size a multiple of 8: runs on 1, 2, 4 or 8 devices
    epochs=2,
    total_episodes=16 * 6,
    max_new_tokens=8,
    temperature=1.0,
    save_every=2,
    log_samples_every=2,
    out_dir="runs/tiny",
)


def _algo(name: str, **kw) -> AlgoConfig:
    return AlgoConfig(name=name, tau=0.05, gamma=1.0, lam=0.95, **kw)


# TRL whitens PPO's advantages per process: the paper ran 4 GPUs.
_PAPER_PPO = dict(whiten_groups=4)

PRESETS: dict[str, RunConfig] = {
    "tldr-klq": RunConfig(task=TLDR_TASK, algo=_algo("klq"), out_dir="runs/tldr-klq", **_PAPER),
    "tldr-ppo": RunConfig(task=TLDR_TASK, algo=_algo("ppo", **_PAPER_PPO), out_dir="runs/tldr-ppo",
                          **_PAPER),
    "hh-klq": RunConfig(task=HH_TASK, algo=_algo("klq"), out_dir="runs/hh-klq", **_PAPER),
    "hh-ppo": RunConfig(task=HH_TASK, algo=_algo("ppo", **_PAPER_PPO), out_dir="runs/hh-ppo", **_PAPER),
    "imdb-klq": RunConfig(task=IMDB_TASK, algo=_algo("klq"), out_dir="runs/imdb-klq", **_IMDB),
    "imdb-ppo": RunConfig(task=IMDB_TASK, algo=_algo("ppo", **_PAPER_PPO), out_dir="runs/imdb-ppo",
                          **_IMDB),
    "tiny-klq": RunConfig(task=TINY_TASK, algo=_algo("klq"), **_TINY),
    "tiny-ppo": RunConfig(task=TINY_TASK, algo=_algo("ppo"), **dict(_TINY, out_dir="runs/tiny-ppo")),
}


def get(name: str) -> RunConfig:
    """The preset called ``name`` (a fresh, frozen config)."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {', '.join(sorted(PRESETS))}")
    return dataclasses.replace(PRESETS[name])
