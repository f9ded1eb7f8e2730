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
from klq_jax.errors import MeshError

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
            raise MeshError(
                f"{n} devices cannot be split into fsdp={fsdp} x tensor={tensor}; choose sizes whose "
                "product divides the device count."
            )
        data = n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise MeshError(
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
    earlier dim) is replicated instead, so every model shape works on every mesh: such a tensor
    then sits whole along that axis on every device (more memory; :func:`replicated_by_size` lists
    them, and ``klq train`` logs them).
    """
    if not axes:
        return P()
    out, _ = _dims_on_mesh(axes, shape, mesh)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _dims_on_mesh(axes: tuple, shape: tuple[int, ...], mesh: Mesh) -> tuple[list, list[tuple[str, int]]]:
    """:func:`spec_for`'s rule: the mesh axis of each dim (None: replicated), and the ``(mesh axis,
    dim size)`` left unused by any dim because the size does not divide the axis (size > 1)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the array shape {shape}")
    out, used, by_size = [], set(), []
    for name, size in zip(axes, shape):
        mesh_axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        if mesh_axis is None or mesh_axis in used or mesh.shape[mesh_axis] == 1:
            out.append(None)
        elif size % mesh.shape[mesh_axis]:
            out.append(None)
            by_size.append((mesh_axis, size))
        else:
            out.append(mesh_axis)
            used.add(mesh_axis)
    firsts = {}
    for mesh_axis, size in by_size:  # one per mesh axis; not one a later dim took
        if mesh_axis not in used:
            firsts.setdefault(mesh_axis, size)
    return out, list(firsts.items())


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _axes_and_shape(var: nnx.Variable) -> tuple[tuple | None, tuple[int, ...]]:
    """The logical ``axes`` metadata and the shape of one ``nnx.Param`` (concrete or abstract)."""
    value = var.get_value() if hasattr(var, "get_value") else var.value
    axes = var.get_metadata().get("axes") if hasattr(var, "get_metadata") else getattr(var, "axes", None)
    return axes, tuple(value.shape)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """The ``NamedSharding`` of one ``nnx.Param`` (concrete or abstract) from its ``axes``."""
    return NamedSharding(mesh, spec_for(*_axes_and_shape(var), mesh))


def replicated_by_size(params: Any, mesh: Mesh) -> list[tuple[str, tuple[int, ...], str, int, int]]:
    """The parameters that :func:`spec_for` keeps whole over a mesh axis of size > 1 because the
    dim mapped onto it does not divide it: ``(name, shape, mesh axis, axis size, dim size)`` each.

    Example (vocab 10 over ``tensor=8``; ``embed`` over ``fsdp=1`` is not a replication by size)::

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> mesh = jax.sharding.AbstractMesh((1, 1, 8), MESH_AXES)  # (the shape is all it needs)
        >>> p = nnx.State({"emb": nnx.Param(jnp.zeros((10, 4)), axes=("vocab", "embed"))})
        >>> replicated_by_size(p, mesh)
        [('emb', (10, 4), 'tensor', 8, 10)]
    """
    out = []
    for path, var in nnx.to_flat_state(params):
        if not _is_var(var):
            continue
        axes, shape = _axes_and_shape(var)
        if not axes:
            continue
        for axis, size in _dims_on_mesh(axes, shape, mesh)[1]:
            out.append((".".join(str(k) for k in path), shape, axis, int(mesh.shape[axis]), int(size)))
    return out


def replication_note(params: Any, mesh: Mesh) -> str | None:
    """One line naming what :func:`replicated_by_size` finds (layers collapsed to ``layers.*``),
    or None when every mapped dim divides its mesh axis."""
    import re

    seen: dict[str, str] = {}
    for name, shape, axis, n, size in replicated_by_size(params, mesh):
        key = re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", name)
        seen.setdefault(key, f"{key} {list(shape)} (dim {size} over {axis}={n})")
    if not seen:
        return None
    return (
        f"{len(seen)} parameter(s) sit whole on every device along a mesh axis that their size does not "
        f"divide (replicated there: more memory per device): {', '.join(seen.values())}. For less memory "
        "choose mesh sizes that divide these dims."
    )


def param_shardings(params: Any, mesh: Mesh) -> Any:
    """A pytree of ``NamedSharding`` (a prefix of ``params``) from each ``nnx.Param``'s ``axes``.

    Works for abstract params (``jax.ShapeDtypeStruct`` leaves) and for optimizer states whose
    leaves keep the ``nnx.Param`` wrappers (optax's ``tree_map`` preserves them). Leaves that are not
    wrapped in a variable (step counters, …) are replicated.
    """

    def one(x):
        return variable_sharding(x, mesh) if _is_var(x) else NamedSharding(mesh, P())

    return jax.tree_util.tree_map(one, params, is_leaf=_is_var)


def build_sharded(fn, *args, mesh: Mesh | None):
    """``fn(*args) -> (graphdef, params)`` with the parameters CREATED in their shardings.

    ``jax.eval_shape`` gives the abstract parameters (with each ``nnx.Param``'s logical axes),
    :func:`param_shardings` their placement, and a ``jax.jit`` of ``fn`` with those
    ``out_shardings`` materialises every tensor directly on its devices: no parameter ever exists
    whole on one device (a random initialisation, a critic spliced from a reward model). ``mesh=None``
    calls ``fn`` as it is.

    Example:
      >>> import jax
      >>> from klq_jax import sharding
      >>> from klq_jax.models import gpt_neox
      >>> mesh = sharding.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
      >>> cfg = gpt_neox.GPTNeoXConfig.tiny()
      >>> gd, p = sharding.build_sharded(gpt_neox.init, cfg, jax.random.key(0), mesh=mesh)
      >>> p["embed_in"][...].sharding.mesh == mesh
      True
    """
    if mesh is None:
        return fn(*args)
    graphdefs = []

    def params_only(*a):
        graphdef, params = fn(*a)
        graphdefs.append(graphdef)
        return params

    static = [i for i, a in enumerate(args) if not _is_array_tree(a)]
    abstract = jax.eval_shape(params_only, *args) if not static else jax.eval_shape(
        lambda *dyn: params_only(*_merge_args(args, static, dyn)), *_dynamic(args, static))
    out = param_shardings(abstract, mesh)
    if not static:
        params = jax.jit(params_only, out_shardings=out)(*args)
    else:
        params = jax.jit(lambda *dyn: params_only(*_merge_args(args, static, dyn)),
                         out_shardings=out)(*_dynamic(args, static))
    return graphdefs[-1], params


def _is_array_tree(a) -> bool:
    leaves = jax.tree_util.tree_leaves(a)
    return bool(leaves) and all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)


def _dynamic(args, static):
    return [a for i, a in enumerate(args) if i not in static]


def _merge_args(args, static, dyn):
    dyn = iter(dyn)
    return [a if i in static else next(dyn) for i, a in enumerate(args)]


def gather_fsdp(params: Any, mesh: Mesh | None) -> Any:
    """Inside ``jit``: the parameters with their ``fsdp`` split gathered (``tensor`` splits kept).

    FSDP keeps each weight split over the ``fsdp`` devices at rest; where a program uses it, the
    weight must be all-gathered so that every device multiplies its OWN rows by the whole weight.
    Pinning this once at the top of a program (e.g. before the sampler's decode loop) makes XLA
    gather weights, not the batch: without it, the compiler may instead gather activations across
    the ``fsdp`` devices and split the hidden dimension. ``mesh=None`` returns ``params``.
    """
    if mesh is None or mesh.shape["fsdp"] == 1:
        return params

    def one(x):
        if not _is_var(x):
            return x
        spec = variable_sharding(x, mesh).spec
        gathered = P(*[None if a == "fsdp" else a for a in spec])
        value = x.get_value() if hasattr(x, "get_value") else x.value
        return x.replace(jax.lax.with_sharding_constraint(value, NamedSharding(mesh, gathered)))

    return jax.tree_util.tree_map(one, params, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of a ``[B, ...]`` batch: the batch axis over ``('data', 'fsdp')``, the rest replicated.

    The spec names only the leading axis, so one sharding fits arrays of every rank ``>= 1``
    (``ndim`` only pads the spec with explicit ``None`` entries)."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """``data × fsdp``: the number of batch shards (devices that each hold their own rows)."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Place every ``[B, ...]`` array of ``batch`` on the mesh with its batch axis split over the
    data axes (0-d arrays replicated).

    Host (numpy) arrays are THIS process's rows: every process passes its own slice and they are
    joined into one global array (``jax.make_array_from_process_local_data``; on one process the
    slice is the whole batch). A ``jax.Array`` is already global and is only resharded.

    Raises:
      ValueError: the global batch does not divide over the ``data × fsdp`` devices.
    """
    n = data_parallel_size(mesh)

    def put(x):
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, P()))
        is_global = isinstance(x, jax.Array)
        rows = x.shape[0] * (1 if is_global else jax.process_count())
        if rows % n:
            raise ValueError(
                f"A batch of {rows} rows cannot be split over {n} data-parallel devices; "
                f"use batch sizes that are multiples of {n}."
            )
        sh = batch_sharding(mesh)
        if is_global:
            return jax.device_put(x, sh)
        return jax.make_array_from_process_local_data(sh, np.asarray(x))

    return jax.tree_util.tree_map(lambda x: put(x if isinstance(x, jax.Array) else np.asarray(x)), batch)


def constrain_batch(tree: Any, mesh: Mesh | None, batch_size: int | None = None) -> Any:
    """Inside ``jit``: pin every array of ``tree`` whose leading axis is the batch axis to the
    batch sharding (``with_sharding_constraint``), so each device computes only its own rows.

    ``batch_size``: only arrays with this leading size are pinned (others, e.g. a scalar step
    counter, are left to the compiler); ``None`` pins every array of rank >= 1. ``mesh=None``
    (one device) returns ``tree`` unchanged: the single-device path is the same code.
    """
    if mesh is None:
        return tree
    sh = batch_sharding(mesh)

    def one(x):
        if getattr(x, "ndim", 0) >= 1 and (batch_size is None or x.shape[0] == batch_size):
            return jax.lax.with_sharding_constraint(x, sh)
        return x

    return jax.tree_util.tree_map(one, tree)


def process_rows(tree: Any, mesh: Mesh | None = None) -> Any:
    """This process's rows of batch-sharded global arrays, as numpy (the inverse of
    :func:`shard_batch`): on one process the whole batch; with several processes the rows that
    its devices hold (the slice its prompt iterator read)."""
    if mesh is None or jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    specs = jax.tree_util.tree_map(lambda x: P(BATCH_AXES) if x.ndim else P(), tree)
    local = multihost_utils.global_array_to_host_local_array(tree, mesh, specs)
    return jax.tree_util.tree_map(np.asarray, local)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_DISTRIBUTED_DONE = False


def initialize_distributed() -> None:
    """Call ``jax.distributed.initialize()`` on multi-process runs (a no-op on one process).

    Call it first, before anything touches a device. A multi-process run is recognised by
    ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0), SLURM (``SLURM_NTASKS`` > 1: JAX
    reads the rest from SLURM), or TPU pods (``TPU_WORKER_HOSTNAMES``); ``KLQ_DISTRIBUTED=1``
    forces it. ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` give the process count and this
    process's index where no cluster manager does (e.g. several processes started by hand or by
    ``torchrun``-style launchers on one machine). CPU processes talk through gloo collectives.
    """
    global _DISTRIBUTED_DONE
    if _DISTRIBUTED_DONE:
        return
    _DISTRIBUTED_DONE = True
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1
    wanted = env.get("KLQ_DISTRIBUTED") == "1" or slurm or any(
        v in env for v in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES")
    )
    if not wanted:
        return
    kwargs = {}
    if "JAX_COORDINATOR_ADDRESS" in env:
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    for var, name in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if var in env:
            kwargs[name] = int(env[var])
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:  # already initialised
        if "already" not in str(e):
            raise
