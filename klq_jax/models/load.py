"""Model sources: where a model comes from, and the ONE function that loads any of them.

A source is ``"random:<preset>"`` (a Pythia or Llama 3.2 preset name, ``tiny`` or ``llama-tiny``), a local Hugging Face
directory, a directory written by ``klq-convert hf-to-flax``, or a hub name (needs the network;
set ``KLQ_LOCAL_MODELS=/dir`` to map ``org/name`` onto ``/dir/org/name``). :func:`load_model`
reads every kind and applies the caller's options (dtype, value head, mesh) the same way.
"""

from __future__ import annotations

import os
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from klq_jax import sharding
from klq_jax.models import critic as critic_lib
from klq_jax.models import decoder, gpt_neox, hf, llama


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
    if source.startswith((".", "/", "~")):  # a path, never a hub name: it is just not there
        raise FileNotFoundError(f"{source!r}: no such file or directory; pass an existing directory.")
    looks_like_hub_name = source.count("/") == 1
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
    """``(config, graphdef, params)`` of a model (GPT-NeoX, Llama, ...) from ``source`` (see the module doc).

    Every source kind (``random:<preset>``, a Hugging Face directory, a ``klq-convert hf-to-flax``
    directory such as a run's exported ``policy/``, a hub name) is read, then the requested options
    are applied by ONE function, :func:`apply_model_options`, whatever the source stored: the compute
    ``dtype``, the parameter storage ``param_dtype``, the value head (added from ``value_head.
    safetensors`` or freshly from ``key`` when asked for and missing, dropped when not asked for),
    and the ``mesh`` placement (a Hugging Face or klq_jax checkpoint is placed tensor by tensor as it
    is read).

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
    if mesh is not None:  # a no-op for tensors already in place (read or built sharded)
        params = jax.device_put(params, sharding.param_shardings(params, mesh))
    return new_cfg, graphdef, params


def _read_model(source: str, *, key, value_head: bool, dtype: str, param_dtype: str, mesh):
    """``(config, params)`` as ``source`` stores them (options not yet applied; see
    :func:`apply_model_options`). A Hugging Face checkpoint is read with the options given, so a
    large model is cast and placed tensor by tensor."""
    source = resolve_source(source)
    if source.startswith("random:"):
        name = source.split(":", 1)[1]
        module = llama if name.lower().split("/")[-1].startswith("llama") else gpt_neox
        if name == "tiny":
            cfg = gpt_neox.GPTNeoXConfig.tiny()
        elif module is llama:
            cfg = llama.LlamaConfig.tiny() if name.lower() == "llama-tiny" else llama.LlamaConfig.from_preset(name)
        else:
            cfg = gpt_neox.GPTNeoXConfig.from_preset(name)
        cfg = cfg.replace(value_head=value_head, dtype=dtype, param_dtype=param_dtype)
        _, params = sharding.build_sharded(module.init, cfg, key, mesh=mesh)  # born sharded
        return cfg, params
    if os.path.isdir(source) and os.path.exists(os.path.join(source, "klq_config.json")):
        cfg, _, params = hf.load_flax(source, mesh=mesh)
        return cfg, params
    cfg, _, params = hf.load_hf(
        source, dtype=dtype, param_dtype=param_dtype, value_head=value_head, key=key, mesh=mesh
    )
    return cfg, params


def attach_critic(graphdef, params, source: str, *, key, dtype: str = "float32", mesh=None):
    """TRL's layout: ``(graphdef, params, ref_graphdef, ref_params)`` of the policy with a critic.

    The policy's value head is replaced by a separate value network initialised from the
    score-head (reward) model at ``source`` (:mod:`klq_jax.models.critic`); π_b is a frozen copy of
    the plain policy. With a ``mesh`` the reward model is read into its shardings and the
    combined model is assembled inside one jitted program whose outputs are sharded
    (:func:`klq_jax.sharding.build_sharded`).
    """
    rm_cfg, rm_graphdef, rm_params = load_model(source, key=key, dtype=dtype, mesh=mesh)
    if not rm_cfg.score_head:
        raise ValueError(
            f"The critic source {source!r} is not a score-head (reward) model; the critic is "
            "initialised from a GPTNeoXForSequenceClassification checkpoint."
        )
    gd, p = sharding.build_sharded(
        critic_lib.with_critic_from_reward_model, graphdef, params, rm_graphdef, rm_params, mesh=mesh
    )
    policy = nnx.merge(gd, p).policy
    ref_graphdef, ref_params = nnx.split(policy, nnx.Param)
    ref_params = jax.tree_util.tree_map(jnp.copy, ref_params)
    return gd, p, ref_graphdef, ref_params
