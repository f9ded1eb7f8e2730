"""Tasks: how a config becomes models + prompts + a reward (an :class:`Experiment`).

A task is named by :attr:`TaskConfig.kind`:

* ``"synthetic"``: random or given GPT-NeoX policy, random prompts over its vocabulary, and a
  programmatic reward (no tokenizer, no network) — for tests and CPU smoke runs.
* ``"tldr"``, ``"hh"``, ``"imdb"``: the paper's experiments (see :mod:`klq_jax.presets`).

Model sources (``TaskConfig.policy`` / ``reference`` / ``reward_model``) are resolved by
:func:`load_model`: ``"random:<preset>"`` (a Pythia or Llama 3.2 preset name, ``tiny`` or ``llama-tiny``), a local Hugging Face
directory, a directory written by ``klq-convert hf-to-flax``, or a hub name (needs the network; set
``KLQ_LOCAL_MODELS=/dir`` to map ``org/name`` onto ``/dir/org/name``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np

from klq_jax.models import decoder, gpt_neox

# ------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Which models, prompts and reward an experiment uses.

    Attributes:
      kind: ``"synthetic"``, ``"tldr"``, ``"hh"`` or ``"imdb"``.
      policy: the initial policy (and π_b unless ``reference`` is set); see the module docstring.
      reference: the reference policy π_b (default: the initial policy).
      reward_model: a reward model (score head) source, for the RM-based tasks.
      critic: a separate value network initialised from this score-head model (``"reward_model"``:
        the task's reward model), TRL's layout; default ``None``: a value head on the policy's body
        (the paper).
      reward: the programmatic reward of the synthetic task: ``"target_token"`` (fraction of
        response tokens equal to ``target_token``), ``"low_tokens"`` (fraction of response tokens
        with ids below ``target_token``: a dense reward that is easy to increase) or ``"length"``
        (response length / T_max).
      target_token: the token the ``"target_token"`` reward likes.
      dataset: dataset hub name or local path (the task's default when ``None``).
      dataset_subset: e.g. HH's ``"helpful-base"``.
      split: dataset split for training prompts.
      max_prompt_len: prompt token budget (TL;DR: 512).
      tokenizer: tokenizer source (default: the policy's directory).
      reward_tokenizer: the reward model's tokenizer when it differs from the policy's (HH).
      reward_label: the class whose logit is the reward, for a classifier reward model (IMDb's
        DistilBERT: ``"POSITIVE"``, looked up in its ``config.label2id``).
      prompt_length_range: IMDb's half-open range ``[lo, hi)`` of prompt lengths in tokens (the
        first ``k`` tokens of each review, ``k`` drawn per review; TRL: ``(2, 8)``).
      dtype: compute dtype of every model (``"float32"``, ``"bfloat16"``).
      num_prompts: size of the synthetic prompt set.
      prompt_len: longest synthetic prompt.
      stop_token_id: the stop token (Pythia's EOS ``<|endoftext|>`` is 0).
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


@dataclasses.dataclass
class Experiment:
    """What a task provides to :func:`klq_jax.train.train`.

    Attributes:
      graphdef, params: the policy (with a value head); ``params`` become θ_0.
      reward_fn: ``(prompt_ids, prompt_mask, response_ids, response_mask) -> scores [B]`` (R_φ).
      prompts: an iterator with ``next()``, ``state_dict()``, ``load_state_dict()`` yielding
        ``{"prompt_ids": [B, Tq], "prompt_mask": [B, Tq], ...}`` (numpy, global batch).
      ref_graphdef, ref_params: the frozen reference policy π_b (default: a copy of θ_0).
      stop_token_ids, pad_token_id: for the sampler.
      decode: optional ``token ids -> str`` for logged samples.
      tokenizer: the policy's Hugging Face tokenizer (saved next to the exported policy at the
        end of training), or None.
    """

    graphdef: Any
    params: Any
    reward_fn: Callable
    prompts: Any
    ref_graphdef: Any = None
    ref_params: Any = None
    stop_token_ids: tuple[int, ...] = (0,)
    pad_token_id: int = 0
    decode: Callable | None = None
    tokenizer: Any = None


# ------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------


def resolve_source(source: str, *, kind: Literal["model", "dataset"] = "model") -> str:
    """Where to read ``source`` from: a local path, a local copy of a hub name, or a Hub download.

    In order:

    1. ``"random:<preset>"`` and existing local paths are returned as they are;
    2. with ``KLQ_LOCAL_MODELS=/dir`` set, a hub name ``org/name`` whose copy ``/dir/org/name``
       exists maps onto it (models and datasets alike, e.g. ``/dir/Anthropic/hh-rlhf``);
    3. a dataset hub name is returned as it is (``datasets.load_dataset`` fetches it);
    4. a model hub name is downloaded with ``huggingface_hub.snapshot_download`` (config,
       tokenizer files and the weights: safetensors when the repo has them, else ``.bin``) and
       the local snapshot directory is returned.

    Raises:
      FileNotFoundError: a model that is neither local nor downloadable (no network, unknown
        name); the message names ``KLQ_LOCAL_MODELS`` and the path it looked for.

    Example::

        >>> resolve_source("random:tiny")
        'random:tiny'
    """
    if source.startswith("random:") or os.path.exists(source):
        return source
    root = os.environ.get("KLQ_LOCAL_MODELS")
    candidate = os.path.join(root, source) if root else None
    if candidate is not None and os.path.exists(candidate):
        return candidate
    if kind == "dataset":
        return source
    hint = (
        f"set KLQ_LOCAL_MODELS=/dir with a copy of the model at /dir/{source} (looked for "
        f"{candidate})" if root else
        f"set KLQ_LOCAL_MODELS=/dir and put a copy of the model at /dir/{source} (KLQ_LOCAL_MODELS is "
        "not set)"
    )
    looks_like_hub_name = source.count("/") == 1 and not source.startswith((".", "/", "~"))
    if not looks_like_hub_name:
        raise FileNotFoundError(
            f"Model source {source!r} is not a local path and not a Hugging Face hub name (org/name); "
            f"pass an existing directory, a hub name, or 'random:<preset>'; or {hint}."
        )
    try:
        from huggingface_hub import HfApi, snapshot_download

        try:
            files = HfApi().list_repo_files(source)
            weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        except Exception:  # offline (HF_HUB_OFFLINE): whatever the local Hub cache holds
            weights = ["*.safetensors", "*.bin"]
        return snapshot_download(
            source, allow_patterns=["*.json", "*.txt", "*.model", "*.jinja", "tokenizer*"] + weights
        )
    except Exception as err:  # offline, unknown repo, gated repo, ...
        raise FileNotFoundError(
            f"Could not find model {source!r} locally or download it from the Hugging Face Hub "
            f"({type(err).__name__}: {err}). Without network access, {hint}."
        ) from err


def load_model(
    source: str,
    *,
    key,
    value_head: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh=None,
):
    """``(config, graphdef, params)`` of a GPT-NeoX model from ``source`` (see the module doc).

    Every source kind (``random:<preset>``, a Hugging Face directory, a ``klq-convert hf-to-flax``
    directory such as a run's exported ``policy/``, a hub name) is read, then the requested options
    are applied by ONE function, :func:`apply_model_options`, whatever the source stored: the compute
    ``dtype``, the parameter storage ``param_dtype``, the value head (added from ``value_head.
    safetensors`` or freshly from ``key`` when asked for and missing, dropped when not asked for),
    and the ``mesh`` placement (a Hugging Face checkpoint is placed tensor by tensor as it is read).

    Args:
      source: the model source.
      key: PRNG key of a new value head (and of a random model).
      value_head: the model has a value head ``V(s_t)`` (the policy θ) or not (π_b, reward models).
      dtype: compute dtype (``"float32"``, ``"bfloat16"``, ``"float16"``).
      param_dtype: storage dtype of the parameters (float32: the trainer's master weights).
      mesh: place the parameters with :mod:`klq_jax.sharding`'s rules on this mesh.
    """
    cfg, params = _read_model(
        source, key=key, value_head=value_head, dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )
    return apply_model_options(
        cfg, params, key=key, value_head=value_head, dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )


def apply_model_options(
    cfg,
    params,
    *,
    key=None,
    value_head: bool = False,
    dtype: str = "float32",
    param_dtype: str = "float32",
    mesh=None,
):
    """``(config, graphdef, params)`` of a loaded model with the requested options applied.

    The one place where loading options take effect (:func:`load_model` calls it for every source
    kind): the config gets ``dtype``, ``param_dtype`` and ``value_head``; the graphdef is rebuilt
    from that config (the compute dtype lives in the graphdef); parameters are cast to
    ``param_dtype``; a value head missing from ``params`` is initialised from ``key``
    (:func:`klq_jax.models.decoder.init_value_head`), one present but not wanted is dropped; with
    a ``mesh`` the parameters are placed with their shardings. Options the source already satisfies
    cost nothing.

    Raises:
      ValueError: a value head is needed and ``key`` is None.
    """
    from flax import nnx

    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{name}={value!r} must be 'float32', 'bfloat16' or 'float16'")
    import importlib

    module = importlib.import_module(type(cfg).__module__)  # the network of this config
    if not hasattr(cfg, "value_head"):
        if value_head:
            raise ValueError(f"A value head was asked for, but a {type(cfg).__name__} model cannot carry one.")
        new_cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype)
    else:
        new_cfg = cfg.replace(dtype=dtype, param_dtype=param_dtype, value_head=value_head)
    graphdef, abstract = module.abstract_params(new_cfg)
    pure = nnx.to_pure_dict(params)
    if value_head and "value_kernel" not in pure:
        if key is None:
            raise ValueError(
                "A value head was asked for and the model has none: pass a PRNG key "
                "(key=jax.random.key(seed)) to initialise it."
            )
        pure.update(decoder.init_value_head(new_cfg, key))
    if not value_head:
        pure.pop("value_kernel", None)
        pure.pop("value_bias", None)
    pd = jnp.dtype(param_dtype)
    pure = jax.tree_util.tree_map(lambda x: x if x.dtype == pd else x.astype(pd), pure)
    nnx.replace_by_pure_dict(abstract, pure)
    params = abstract
    if mesh is not None:
        from klq_jax import sharding

        params = jax.device_put(params, sharding.param_shardings(params, mesh))
    return new_cfg, graphdef, params


def _read_model(source: str, *, key, value_head: bool, dtype: str, param_dtype: str, mesh):
    """``(config, params)`` as ``source`` stores them (options not yet applied; see
    :func:`apply_model_options`). A Hugging Face checkpoint is read with the options given, so a
    large model is cast and placed tensor by tensor."""
    source = resolve_source(source)
    if source.startswith("random:"):
        name = source.split(":", 1)[1]
        from klq_jax.models import llama

        module = llama if name.lower().split("/")[-1].startswith("llama") else gpt_neox
        if name == "tiny":
            cfg = gpt_neox.GPTNeoXConfig.tiny()
        elif module is llama:
            cfg = llama.LlamaConfig.tiny() if name.lower() == "llama-tiny" else llama.LlamaConfig.from_preset(name)
        else:
            cfg = gpt_neox.GPTNeoXConfig.from_preset(name)
        cfg = cfg.replace(value_head=value_head, dtype=dtype, param_dtype=param_dtype)
        _, params = module.init(cfg, key)
        return cfg, params
    from klq_jax.models import hf

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "klq_config.json")):
        cfg, _, params = hf.load_flax(source)
        return cfg, params
    cfg, _, params = hf.load_hf(
        source, dtype=dtype, param_dtype=param_dtype, value_head=value_head, key=key, mesh=mesh
    )
    return cfg, params


def attach_critic(task: TaskConfig, graphdef, params, *, key):
    """Apply ``task.critic``: ``(graphdef, params, ref_graphdef, ref_params)``.

    Without a critic the inputs come back unchanged (ref ``None``: the trainer freezes a copy of
    θ_0). With one, the policy's value head is replaced by a separate value network initialised
    from the named score-head model (:mod:`klq_jax.models.critic`), and π_b is the plain policy.
    """
    if task.critic is None:
        return graphdef, params, None, None
    from klq_jax.models import critic as critic_lib

    source = task.reward_model if task.critic == "reward_model" else task.critic
    if source is None:
        raise ValueError("TaskConfig.critic='reward_model' needs TaskConfig.reward_model to be set.")
    rm_cfg, rm_graphdef, rm_params = load_model(source, key=key, dtype=task.dtype)
    if not rm_cfg.score_head:
        raise ValueError(
            f"TaskConfig.critic={source!r} is not a score-head (reward) model; the critic is "
            "initialised from a GPTNeoXForSequenceClassification checkpoint."
        )
    gd, p = critic_lib.with_critic_from_reward_model(graphdef, params, rm_graphdef, rm_params)
    from flax import nnx

    policy = nnx.merge(gd, p).policy
    ref_graphdef, ref_params = nnx.split(policy, nnx.Param)
    ref_params = jax.tree_util.tree_map(jnp.copy, ref_params)
    return gd, p, ref_graphdef, ref_params


# ------------------------------------------------------------------------------------------
# The synthetic task
# ------------------------------------------------------------------------------------------


def synthetic_prompts(num_prompts: int, max_len: int, vocab_size: int, seed: int, pad_id: int = 0):
    """Random left-padded prompts of lengths 1..max_len over tokens ``1..vocab_size-1``."""
    from klq_jax.data import PromptDataset

    rng = np.random.RandomState(seed)
    lengths = rng.randint(1, max_len + 1, size=num_prompts)
    ids = np.full((num_prompts, max_len), pad_id, np.int32)
    mask = np.zeros((num_prompts, max_len), np.float32)
    for i, n in enumerate(lengths):
        ids[i, max_len - n :] = rng.randint(1, vocab_size, size=n)
        mask[i, max_len - n :] = 1.0
    return PromptDataset(
        prompt_ids=ids,
        prompt_mask=mask,
        prompt_texts=[" ".join(map(str, r[m > 0])) for r, m in zip(ids, mask)],
        references=None,
        pad_id=pad_id,
        name="synthetic",
    )


def programmatic_reward(kind: str, *, target_token: int = 7) -> Callable:
    """A jitted ``(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]`` reward.

    ``"target_token"``: fraction of real response tokens equal to ``target_token``.
    ``"low_tokens"``: fraction of real response tokens with ids in ``[1, target_token)``.
    ``"length"``: response length divided by the response width.
    """

    if kind == "target_token":

        def fn(prompt_ids, prompt_mask, response_ids, response_mask):
            m = response_mask.astype(jnp.float32)
            hits = (response_ids == target_token).astype(jnp.float32) * m
            return hits.sum(1) / jnp.maximum(m.sum(1), 1.0)

    elif kind == "low_tokens":

        def fn(prompt_ids, prompt_mask, response_ids, response_mask):
            m = response_mask.astype(jnp.float32)
            low = (response_ids >= 1) & (response_ids < target_token)
            return (low.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    elif kind == "length":

        def fn(prompt_ids, prompt_mask, response_ids, response_mask):
            return response_mask.astype(jnp.float32).sum(1) / response_mask.shape[1]

    else:
        raise ValueError(
            f"Unknown programmatic reward {kind!r}; choose 'target_token', 'low_tokens' or 'length'"
        )
    return jax.jit(fn)


def build_experiment(
    task: TaskConfig,
    *,
    batch_size: int,
    seed: int,
    score_micro_batch_size: int | None = None,
    mesh=None,
) -> Experiment:
    """Build the :class:`Experiment` of ``task`` for global batches of ``batch_size`` prompts.

    ``score_micro_batch_size`` bounds the reward model's forward batch (RM-based tasks); with a
    ``mesh`` the policy and reference are loaded straight into their shardings.
    """
    if task.kind == "synthetic":
        return _build_synthetic(task, batch_size=batch_size, seed=seed, mesh=mesh)
    from klq_jax import paper_tasks

    return paper_tasks.build(
        task, batch_size=batch_size, seed=seed, score_micro_batch_size=score_micro_batch_size,
        mesh=mesh,
    )


def _build_synthetic(task: TaskConfig, *, batch_size: int, seed: int, mesh=None) -> Experiment:
    from klq_jax.data import PromptIterator

    key = jax.random.key(seed)
    cfg, graphdef, params = load_model(task.policy, key=key, value_head=True, dtype=task.dtype, mesh=mesh)
    ref_graphdef = ref_params = None
    if task.reference is not None:
        _, ref_graphdef, ref_params = load_model(task.reference, key=key, dtype=task.dtype, mesh=mesh)
    if task.critic is not None:
        graphdef, params, crit_ref_gd, crit_ref_p = attach_critic(task, graphdef, params, key=key)
        if ref_params is None:
            ref_graphdef, ref_params = crit_ref_gd, crit_ref_p
    ds = synthetic_prompts(task.num_prompts, task.prompt_len, cfg.vocab_size, seed, task.pad_token_id)
    return Experiment(
        graphdef=graphdef,
        params=params,
        reward_fn=programmatic_reward(task.reward, target_token=task.target_token),
        prompts=PromptIterator(ds, batch_size=batch_size, seed=seed),
        ref_graphdef=ref_graphdef,
        ref_params=ref_params,
        stop_token_ids=(task.stop_token_id,),
        pad_token_id=task.pad_token_id,
    )
