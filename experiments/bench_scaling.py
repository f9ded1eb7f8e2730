"""Scaling benchmark: one training iteration on 1, 2, 4 and 8 devices of this machine.

For each device count ``n`` it builds the ``(data = n / fsdp, fsdp)`` mesh over the first ``n``
devices, the tiny synthetic task sharded on it, and runs ``--iters`` KLQ iterations after one
warm-up (compilation) iteration, timing the two phases of each:

* **rollout**: prompts placed batch-sharded → sample → π / π_b forwards → reward → rewards →
  targets → metrics, ONE compiled program (:func:`klq_jax.rollout.make_rollout`);
* **update**: the sharded update step (epochs × minibatches × micro-batches, one jit).

It prints the median seconds per iteration of each phase and the **rows per device**, read from
the rollout's ``addressable_shards`` (what each device really holds and decodes: ``B / n``).

On a CPU the devices are simulated (``--xla_force_host_platform_device_count``, set here when
``XLA_FLAGS`` does not) and share the same cores, so the times do not fall with ``n``: the figure
to read there is the per-device work. On a GPU/TPU host the same command measures real speed-up.

Usage: ``python -m experiments.bench_scaling [--batch 32] [--max-new-tokens 16] [--iters 3]
[--fsdp 1] [--devices 1 2 4 8]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import dataclasses  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402

from experiments import presets, tasks  # noqa: E402
from klq_jax import algorithms, rollout, sharding  # noqa: E402
from klq_jax.train import init_state, jit_update_fn, make_optimizer, make_update_fn  # noqa: E402
from klq_jax.train.loop import _targets_and_metrics  # noqa: E402


def bench(n: int, *, batch: int, max_new_tokens: int, iters: int, fsdp: int) -> dict:
    """Median rollout / update seconds per iteration and rows per device on ``n`` devices."""
    fsdp = fsdp if n % fsdp == 0 else 1
    mesh = sharding.make_mesh(n // fsdp, fsdp, 1, devices=jax.devices()[:n])
    cfg = dataclasses.replace(
        presets.get("tiny-klq"), rollouts_per_batch=batch, minibatch_size=batch,
        micro_batch_size=batch, max_new_tokens=max_new_tokens, epochs=1,
    )
    task = dataclasses.replace(cfg.task, num_prompts=batch * (iters + 1))
    exp = tasks.build_experiment(task, batch_size=batch, seed=0, mesh=mesh)
    optimizer, _ = make_optimizer(cfg.optim, 10 * (iters + 1))
    state, state_sh = init_state(exp.params, optimizer, 0, mesh)
    ref_params = jax.tree_util.tree_map(lambda x: x.copy(), state.params)
    update = jit_update_fn(make_update_fn(exp.graphdef, cfg, optimizer), state_sh, mesh)
    finish = functools.partial(_targets_and_metrics, algorithms.get("klq"), cfg.algo)
    sampling_cfg = cfg.sampling_config(exp.stop_token_ids, exp.pad_token_id)
    t_roll, t_upd, rows = [], [], set()
    for i in range(iters + 1):
        prompts = next(exp.prompts)
        t0 = time.perf_counter()
        ro, (train_batch, _) = rollout.make_rollout(
            exp.graphdef, state.params, exp.graphdef, ref_params, exp.reward_fn,
            prompts["prompt_ids"], prompts["prompt_mask"], jax.random.key(i), sampling_cfg,
            omega=cfg.omega, mesh=mesh, finish=finish,
        )
        jax.block_until_ready((ro, train_batch))
        t1 = time.perf_counter()
        state, metrics = update(state, train_batch)
        jax.block_until_ready((state, metrics))
        t2 = time.perf_counter()
        rows = {s.data.shape[0] for s in ro.response_ids.addressable_shards}
        if i:  # iteration 0 compiles
            t_roll.append(t1 - t0)
            t_upd.append(t2 - t1)
    return dict(devices=n, mesh=f"data {n // fsdp} x fsdp {fsdp}", rows_per_device=sorted(rows),
                rollout_s=statistics.median(t_roll), update_s=statistics.median(t_upd))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].platform}: B={args.batch} rows, T_max={args.max_new_tokens}, "
          f"median of {args.iters} iterations after a compile")
    print(f"{'devices':>7}  {'mesh':<16} {'rows/device':>11}  {'rollout s/it':>12}  {'update s/it':>11}")
    for n in args.devices:
        r = bench(n, batch=args.batch, max_new_tokens=args.max_new_tokens, iters=args.iters,
                  fsdp=args.fsdp)
        print(f"{r['devices']:>7}  {r['mesh']:<16} {','.join(map(str, r['rows_per_device'])):>11}  "
              f"{r['rollout_s']:>12.3f}  {r['update_s']:>11.3f}", flush=True)


if __name__ == "__main__":
    main()
