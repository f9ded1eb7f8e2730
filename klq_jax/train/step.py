"""The update phase of one iteration as ONE sharded ``jax.jit`` (paper Algorithms 1-2).

:func:`make_update_fn` builds a pure function ``(state, batch) -> (state, metrics)``: a
``lax.scan`` over epochs, each drawing a permutation of the rollout batch, a ``lax.scan`` over its
minibatches, and gradient accumulation over micro-batches (a ``lax.scan`` whose micro-batch losses
are weighted by their share of the minibatch's real tokens, so the accumulated gradient equals the
full-minibatch gradient of the Σ-over-tokens / Σ T loss of Algorithms 1-2). :func:`jit_update_fn`
runs it sharded over a ``(data, fsdp, tensor)`` mesh (:mod:`klq_jax.sharding`) with the state
donated; :func:`init_state` builds the state sharded from the start.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from klq_jax import algorithms, rollout, sharding
from klq_jax.config import TrainConfig
from klq_jax.types import Batch

Array = jax.Array


class TrainState(NamedTuple):
    """Everything that changes during training (one pytree: sharded, donated, checkpointed).

    Attributes:
      params: the policy's ``nnx.State`` (LM head + value head).
      opt_state: optax state.
      step: ``[]`` int32 optimizer steps taken.
      key: ``[2]`` uint32 raw PRNG key data (``jax.random.key_data``).
    """

    params: Any
    opt_state: Any
    step: Array
    key: Array


def _global_norm(tree):
    norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm
    return norm(tree)


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def make_update_fn(
    graphdef: nnx.GraphDef,
    cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The update phase of one iteration as a pure function ``(state, batch) -> (state, metrics)``.

    ``batch`` is a :class:`klq_jax.types.Batch` of ``N = rollouts_per_batch`` rows: the rollout
    of θ_old with the algorithm's fixed targets filled in (``algorithm.targets``). ``metrics`` are float32 scalars averaged over every
    optimizer step of the iteration (plus ``grad_norm``). Not jitted: see :func:`jit_update_fn`.
    """
    algo = algorithms.get(cfg.algo.name)
    n, mb, mu = cfg.rollouts_per_batch, cfg.minibatch_size, cfg.micro_batch_size
    n_mb, n_micro = n // mb, mb // mu

    def micro_loss(params, micro, n_tokens_minibatch):
        logp, values = rollout.response_logprobs(
            graphdef,
            params,
            micro.prompt_ids,
            micro.prompt_mask,
            micro.response_ids,
            micro.response_mask,
            temperature=cfg.temperature,
        )
        loss, metrics = algo.loss(cfg.algo, logp, values, micro)
        # Share of the minibatch's real tokens: Σ_micro w·loss_micro = Σ tokens / Σ T (Alg. 1-2).
        w = micro.response_mask.sum() / jnp.maximum(n_tokens_minibatch, 1.0)
        metrics = {k: v * w for k, v in metrics.items() if k != "num_tokens"}
        return loss * w, metrics

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def minibatch_step(carry, minibatch):
        params, opt_state = carry
        n_tok = minibatch.response_mask.sum()
        micros = jax.tree_util.tree_map(
            lambda x: x.reshape((n_micro, mu) + x.shape[1:]), minibatch
        )

        def accumulate(acc, micro):
            (loss, metrics), grads = grad_fn(params, micro, n_tok)
            return _tree_add(acc, (loss, metrics, grads)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micros)
        (loss, metrics), grads = grad_fn(params, first, n_tok)
        if n_micro > 1:
            rest = jax.tree_util.tree_map(lambda x: x[1:], micros)
            (loss, metrics, grads), _ = jax.lax.scan(accumulate, (loss, metrics, grads), rest)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = dict(metrics, loss=loss, grad_norm=_global_norm(grads))
        return (params, opt_state), metrics

    def epoch(carry, key):
        batch, params, opt_state = carry
        perm = jax.random.permutation(key, n)
        shuffled = jax.tree_util.tree_map(lambda x: jnp.take(x, perm, axis=0), batch)
        minibatches = jax.tree_util.tree_map(
            lambda x: x.reshape((n_mb, mb) + x.shape[1:]), shuffled
        )
        (params, opt_state), metrics = jax.lax.scan(minibatch_step, (params, opt_state), minibatches)
        return (batch, params, opt_state), metrics

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        key = jax.random.wrap_key_data(state.key)
        key, *epoch_keys = jax.random.split(key, cfg.epochs + 1)
        (_, params, opt_state), metrics = jax.lax.scan(
            epoch, (batch, state.params, state.opt_state), jnp.stack(epoch_keys)
        )
        metrics = jax.tree_util.tree_map(lambda m: jnp.mean(m.astype(jnp.float32)), metrics)
        new_state = TrainState(
            params=params,
            opt_state=opt_state,
            step=state.step + cfg.steps_per_iteration,
            key=jax.random.key_data(key),
        )
        return new_state, metrics

    return update


def state_shardings(state: TrainState, mesh) -> TrainState:
    """NamedShardings for every leaf of a (possibly abstract) :class:`TrainState`."""
    rep = sharding.replicated(mesh)
    return TrainState(
        params=sharding.param_shardings(state.params, mesh),
        opt_state=sharding.param_shardings(state.opt_state, mesh),
        step=rep,
        key=rep,
    )


def jit_update_fn(update, state_sh: TrainState, mesh):
    """``jax.jit`` of an update function with the state sharded/donated, batches data-sharded."""
    return jax.jit(
        update,
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def init_state(params, optimizer, seed: int, mesh) -> tuple[TrainState, TrainState]:
    """Place ``params`` on the mesh and build the optimizer state sharded from the start.

    Returns ``(state, state_shardings)``. The optimizer state is created by a jitted ``init`` whose
    ``out_shardings`` come from ``jax.eval_shape`` of it, so nothing is materialised unsharded.
    """
    key_data = jax.random.key_data(jax.random.key(seed))
    abstract = jax.eval_shape(
        lambda p: TrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32), key_data), params
    )
    sh = state_shardings(abstract, mesh)
    # A fresh copy: the state is donated to the update, and the caller may keep using ``params``.
    params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=sh.params)(params)
    opt_state = jax.jit(optimizer.init, out_shardings=sh.opt_state)(params)
    state = TrainState(
        params=params,
        opt_state=opt_state,
        step=jax.device_put(jnp.zeros((), jnp.int32), sh.step),
        key=jax.device_put(key_data, sh.key),
    )
    return state, sh
