"""Device meshes and the one table that maps logical parameter axes onto them.

The train step is one ``jax.jit`` over a mesh (what ``pjit`` became): parameters and optimizer state
carry :class:`jax.sharding.NamedSharding`\\ s derived from the logical axis names that every
``nnx.Param`` of the model carries in its ``axes`` metadata, and batches are sharded along their
leading (batch) axis over the data-parallel mesh axes. The same code runs on one CPU, 8 GPUs or a
TPU pod; multi-host runs call :func:`initialize_distributed` first.

Mesh axes:
  * ``data``: pure data parallelism (parameters replicated).
  * ``fsdp``: data parallelism with parameters and optimizer state sharded (ZeRO-3 style); XLA
    all-gathers each weight where it is used.
  * ``tensor``: tensor (model) parallelism over heads / MLP width / vocabulary.

Example::

    >>> import jax
    >>> from klq_jax import sharding
    >>> mesh = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    >>> sharding.spec_for(("embed", "mlp"), (32, 64), mesh) == sharding.P()  # 1 device: replicated
    True
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from klq_jax.config import MeshConfig  # noqa: F401  (re-exported)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or None: replicated). One table for the whole library.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "qkv": None,
}

# The batch axis of activations / rollouts is split over every data-parallel mesh axis.
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh (``jax.make_mesh``) over ``devices`` (default: all devices
    of all processes). ``data=-1`` takes every device not used by ``fsdp × tensor``."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(
                f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}; choose sizes whose "
                "product divides the device count."
            )
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(
            f"Mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} does not match "
            f"the {n} available devices. Set the sizes so that their product is {n} (data=-1 fills in)."
        )
    # jax.make_mesh orders the devices by the physical topology (ICI / NVLink). Axis types are
    # Auto: shardings of intermediates are propagated by the compiler (GSPMD), as under pjit.
    return jax.make_mesh(
        (data, fsdp, tensor),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def mesh_from_config(cfg: MeshConfig, devices=None) -> Mesh:
    return make_mesh(cfg.data, cfg.fsdp, cfg.tensor, devices=devices)


def spec_for(axes: tuple | None, shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array with logical ``axes`` (one name per dim) and ``shape``.

    A dim whose size does not divide by its mesh axis (or whose mesh axis is already used by an
    earlier dim) is replicated instead, so every model shape works on every mesh.
    """
    if not axes:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the array shape {shape}")
    out, used = [], set()
    for name, size in zip(axes, shape):
        mesh_axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis in used
            or mesh.shape[mesh_axis] == 1
            or size % mesh.shape[mesh_axis]
        ):
            out.append(None)
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` of one ``nnx.Param`` (concrete or abstract) from its ``axes``."""
    value = var.get_value() if hasattr(var, "get_value") else var.value
    axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else getattr(var, "axes", None)
    return NamedSharding(mesh, spec_for(axes, tuple(value.shape), mesh))


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` (a prefix of ``params``) from each ``nnx.Param``'s ``axes``.

    Works for abstract params (``jax.ShapeDtypeStruct`` leaves) and for optimizer states whose
    leaves keep the ``nnx.Param`` wrappers (optax's ``tree_map`` preserves them). Leaves that are not
    wrapped in a variable (step counters, …) are replicated.
    """

    def one(x):
        return variable_sharding(x, mesh) if _is_var(x) else NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, params, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[B, ...]`` batch: the batch axis over ``('data', 'fsdp')``."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every ``[B, ...]`` array of ``batch`` with its batch axis split over the data axes."""
    n = data_parallel_size(mesh)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        if x.shape[0] % n:
            raise ValueError(
                f"A batch of {x.shape[0]} rows cannot be split over {n} data-parallel devices; "
                f"use batch sizes that are multiples of {n}."
            )
        return jax.device_put(x, batch_sharding(mesh, x.ndim))

    return jax.tree_util.tree_map(put, batch)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_DISTRIBUTED_DONE = False


def initialize_distributed() -> None:
    """Call ``jax.distributed.initialize()`` on multi-host runs (a no-op on one process).

    Multi-host is detected from the usual cluster variables (``JAX_COORDINATOR_ADDRESS``, SLURM,
    TPU pods set their own); set ``KLQ_DISTRIBUTED=1`` to force it.
    """
    global _DISTRIBUTED_DONE
    if _DISTRIBUTED_DONE:
        return
    _DISTRIBUTED_DONE = True
    wanted = os.environ.get("KLQ_DISTRIBUTED") == "1" or any(
        v in os.environ for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES")
    )
    if wanted:
        try:
            jax.distributed.initialize()
        except RuntimeError as e:  # already initialised
            if "already" not in str(e):
                raise
