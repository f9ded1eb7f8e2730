"""Held-out validation during training: the paper's validation curves (Figs. 4-5) and Pareto (Fig. 2).

Every ``TrainConfig.eval_every`` iterations and at the end of the run, :func:`train` calls a
:class:`Validator` with the current parameters. It runs the SAME rollout function as training
(sample → score with π, π_b and R_φ → rewards; sharded like the training rollout because it is
that function) on a fixed set of held-out prompts (the dataset's validation/test split, or a
synthetic set disjoint from the training prompts: ``experiments/tasks.py`` builds it), once per
mode:

* ``"sample"``: at the training sampling configuration (temperature, top-k, top-p), the policy the
  objective is about;
* ``"greedy"``: the argmax response (log-probs and the KL still at the training temperature).

and returns the means of the per-response statistics (:func:`response_stats`)::

    eval/score, eval/kl, eval/rlhf_reward, eval/reward, eval/response_length, eval/truncated_frac
    eval/greedy/score, eval/greedy/kl, ...                  (mode "greedy"; same names)

``kl`` is the sequence log-ratio ``Σ_t log π(a_t|s_t) − log π_b(a_t|s_t)`` of each response (a
sample estimate of KL(π‖π_b) in mode ``"sample"``; in mode ``"greedy"`` only the log-ratio of the
greedy response), ``rlhf_reward = reward − τ·kl`` with ``reward = R_φ − ω·1[no stop token]``.

**PRNG.** The validation key is ``jax.random.key(eval_seed)`` (the same for every validation, so
curves compare policies on common random numbers); it is never derived from, and never advances,
the training key: a run with and without validation trains bit-identically.

Example (a tiny policy, a toy reward; the rollout function is :func:`klq_jax.rollout.make_rollout`
with everything but the parameters, prompts, key and sampling config bound, as in :func:`train`)::

    >>> import functools, jax, numpy as np
    >>> from klq_jax import rollout
    >>> from klq_jax.data import PromptDataset
    >>> from klq_jax.models import gpt_neox
    >>> from klq_jax.sampling import SamplingConfig
    >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(value_head=True), jax.random.key(0))
    >>> reward = lambda pi, pm, ri, rm: rm.sum(-1)
    >>> def rollout_fn(params, ids, mask, key, scfg):
    ...     return rollout.make_rollout(gd, params, gd, p, reward, ids, mask, key, scfg, omega=0.0)
    >>> ds = PromptDataset(np.array([[0, 5, 6], [3, 4, 5], [1, 2, 3]], np.int32),
    ...                    np.array([[0, 1, 1], [1, 1, 1], [1, 1, 1]], np.float32),
    ...                    ["5 6", "3 4 5", "1 2 3"], None, pad_id=0)
    >>> v = Validator(rollout_fn, ds, SamplingConfig(max_new_tokens=4, stop_token_ids=()),
    ...               tau=0.1, batch_size=2, modes=("sample", "greedy"))
    >>> res = v(p)
    >>> res.metrics["eval/response_length"], res.metrics["eval/kl"], len(res.completions)
    (4.0, 0.0, 6)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "EVAL_MODES",
    "response_stats",
    "mean_stats",
    "ValidationResult",
    "Validator",
    "write_completions",
]

EVAL_MODES = ("sample", "greedy")

# The per-response statistics whose means are logged (training: unprefixed; validation: eval/...).
STAT_NAMES = ("score", "reward", "kl", "rlhf_reward", "response_length", "truncated_frac")


def response_stats(ro, tau: float) -> dict[str, np.ndarray]:
    """Per-response statistics of a rollout, ``[B]`` float64 numpy each.

    ``score`` = R_φ(x, y); ``reward`` = Σ_t r_t (R_φ − ω·1[no stop token]); ``kl`` =
    Σ_t (log π − log π_b)(a_t|s_t); ``rlhf_reward`` = reward − τ·kl; ``response_length`` = number
    of real response tokens; ``truncated_frac`` = 1 when the response has no stop token.

    Args:
      ro: a :class:`klq_jax.rollout.Rollout` (``logp``, ``ref_logp``, ``rewards``,
        ``response_mask`` ``[B, Tr]``; ``scores``, ``stopped`` ``[B]``).
      tau: the KL coefficient τ.
    """
    mask = np.asarray(ro.response_mask, np.float64)
    kl = ((np.asarray(ro.logp, np.float64) - np.asarray(ro.ref_logp, np.float64)) * mask).sum(1)
    reward = (np.asarray(ro.rewards, np.float64) * mask).sum(1)
    return {
        "score": np.asarray(ro.scores, np.float64),
        "reward": reward,
        "kl": kl,
        "rlhf_reward": reward - tau * kl,
        "response_length": mask.sum(1),
        "truncated_frac": 1.0 - np.asarray(ro.stopped, np.float64),
    }


def mean_stats(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of every per-response statistic (Python floats)."""
    return {k: float(np.mean(v)) for k, v in stats.items()}


@dataclasses.dataclass
class ValidationResult:
    """One validation: ``metrics`` (``eval/...`` means, Python floats) and ``completions``.

    ``completions``: one dict per (mode, prompt): ``mode``, ``index`` (row of the held-out set),
    ``prompt``, ``response`` (text when a decoder is given, else the token ids as a string),
    ``score``, ``reward``, ``kl`` (per-response), ``rlhf_reward``, ``response_length``,
    ``truncated``.
    """

    metrics: dict[str, float]
    completions: list[dict]


class Validator:
    """Validate a policy on a fixed held-out prompt set (see the module docstring).

    Args:
      rollout_fn: ``(params, prompt_ids [b, Tq], prompt_mask [b, Tq], key, sampling_config) ->
        Rollout``: the training rollout with the models, reward and ω bound.
      prompts: the held-out prompts, a :class:`klq_jax.data.PromptDataset` (``prompt_ids``,
        ``prompt_mask`` ``[K, Tq]``, ``prompt_texts``).
      sampling_config: the TRAINING sampling config; mode ``"greedy"`` sets ``greedy=True`` on it.
      tau: τ (for ``rlhf_reward``).
      batch_size: rows per rollout call (the training batch size reuses the training compile);
        the last batch is filled up with copies of its first row, which are dropped.
      modes: a non-empty subset of :data:`EVAL_MODES`.
      seed: the validation seed (its key never touches the training stream).
      decode: ``token ids -> str`` for the completions' texts (None: the ids as a string).
      prefix: metric name prefix.
    """

    def __init__(
        self,
        rollout_fn: Callable,
        prompts: Any,
        sampling_config,
        *,
        tau: float,
        batch_size: int,
        modes: Sequence[str] = EVAL_MODES,
        seed: int = 0,
        decode: Callable | None = None,
        prefix: str = "eval",
    ):
        modes = tuple(modes)
        if not modes or any(m not in EVAL_MODES for m in modes) or len(set(modes)) != len(modes):
            raise ValueError(f"eval modes {modes!r}: give one or both of {EVAL_MODES}, each once.")
        if batch_size < 1:
            raise ValueError(f"The validation batch size must be positive, got {batch_size}.")
        if len(prompts) == 0:
            raise ValueError("The held-out prompt set is empty; validation needs at least one prompt.")
        self.rollout_fn = rollout_fn
        self.prompts = prompts
        self.tau = float(tau)
        self.batch_size = int(batch_size)
        self.modes = modes
        self.seed = int(seed)
        self.decode = decode
        self.prefix = prefix
        self.configs = {
            "sample": sampling_config,
            "greedy": dataclasses.replace(sampling_config, greedy=True),
        }

    def metric_name(self, mode: str, stat: str) -> str:
        """``eval/<stat>`` for mode ``"sample"``, ``eval/<mode>/<stat>`` otherwise."""
        return f"{self.prefix}/{stat}" if mode == "sample" else f"{self.prefix}/{mode}/{stat}"

    def _batches(self):
        ids = np.asarray(self.prompts.prompt_ids)
        mask = np.asarray(self.prompts.prompt_mask)
        n, b = ids.shape[0], self.batch_size
        for start in range(0, n, b):
            rows = np.arange(start, min(start + b, n))
            fill = np.full(b - len(rows), rows[0])  # dropped after the rollout
            idx = np.concatenate([rows, fill])
            yield rows, ids[idx], mask[idx]

    def __call__(self, params) -> ValidationResult:
        """Validate ``params`` (every mode, every held-out prompt)."""
        key = jax.random.key(self.seed)
        metrics: dict[str, float] = {}
        completions: list[dict] = []
        for mode in self.modes:
            scfg = self.configs[mode]
            stats: dict[str, list] = {k: [] for k in STAT_NAMES}
            for chunk, (rows, ids, mask) in enumerate(self._batches()):
                ro = self.rollout_fn(params, jnp.asarray(ids), jnp.asarray(mask),
                                     jax.random.fold_in(key, chunk), scfg)
                st = {k: v[: len(rows)] for k, v in response_stats(ro, self.tau).items()}
                for k in STAT_NAMES:
                    stats[k].append(st[k])
                completions.extend(self._completions(mode, rows, ro, st))
            for k, v in mean_stats({k: np.concatenate(v) for k, v in stats.items()}).items():
                metrics[self.metric_name(mode, k)] = v
        return ValidationResult(metrics=metrics, completions=completions)

    def _completions(self, mode, rows, ro, st) -> list[dict]:
        rids = np.asarray(ro.response_ids)
        rmask = np.asarray(ro.response_mask) > 0
        out = []
        for j, i in enumerate(rows):
            ids = rids[j][rmask[j]].tolist()
            response = self.decode(ids) if self.decode is not None else " ".join(map(str, ids))
            out.append({
                "mode": mode,
                "index": int(i),
                "prompt": str(self.prompts.prompt_texts[i]),
                "response": str(response),
                "score": float(st["score"][j]),
                "reward": float(st["reward"][j]),
                "kl": float(st["kl"][j]),
                "rlhf_reward": float(st["rlhf_reward"][j]),
                "response_length": int(st["response_length"][j]),
                "truncated": bool(st["truncated_frac"][j] > 0.5),
            })
        return out


def write_completions(path: str, completions: list[dict], *, iteration: int) -> str:
    """Write ``completions`` as JSON lines (each with ``iteration``) to ``path``, atomically
    (a temporary file renamed over ``path``). Returns ``path``."""
    from klq_jax.train.run_dir import atomic_write

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, "".join(json.dumps(dict(c, iteration=int(iteration))) + "\n" for c in completions))
    return path
