"""Benchmark: one whole training iteration, phase by phase, against the machine's limits (and TRL).

One iteration of Algorithms 1-2 as :func:`klq_jax.train.train` runs it, at a given shape (a Pythia
preset, batch ``B``, prompt length ``Tq``, ``T`` new tokens, epochs × minibatches × micro-batches,
KLQ or PPO, a value head on the policy or TRL's separate critic), timed phase by phase:

* **sample**: :func:`klq_jax.sampling.sample` (prefill + KV-cache decode);
* **score**: the scoring forwards of :func:`klq_jax.rollout.make_rollout` (``log π`` and ``V`` of
  the policy, ``log π_b`` of the reference, ``R_φ`` of the reward model) and the rewards; with
  ``--logp sampler`` (the CPU preset, as TRL) ``log π`` is the sampler's and only ``V`` is computed;
* **targets**: the algorithm's fixed targets (GAE / λ-returns);
* **update**: the jitted, donated update (epochs × minibatches × micro-batches of forward+backward
  and AdamW steps);
* **checkpoint**: the part of an orbax save of the train state that the loop waits for
  (:class:`klq_jax.checkpoint.Checkpointer`, as ``train()`` calls it).

The first iteration compiles; its excess over the steady state is reported as **compile**, apart.
Every phase's FLOPs are counted from the model shapes (:func:`forward_flops`, checked against XLA's
cost analysis in the tests) and divided by the machine's matmul rate, measured in the same run on a
GEMM of the model's own shape (and the decode's bytes by the measured memory bandwidth): the
**roofline** time; ``roofline / measured`` is the phase's fraction of it (1.0 = at the limit).

``--peer trl`` runs TRL's ``PPOTrainer`` (trl 1.12, ``trl.experimental.ppo``; ``pip install -e
.[bench]``) on the same random weights and shapes in the same process, its iterations interleaved
with ours (one of ours runs in TRL's ``on_step_end`` callback, so background load hits both alike),
and prints the ratio per phase. TRL's scoring takes ``log π`` from the generation's logits (as ours
with ``--logp sampler``); its "targets" are the KL-shaped rewards + GAE + whitening; it does not
checkpoint (ours waits for its background write outside the timed phases).

Usage::

    python experiments/bench_iteration.py --peer trl          # CPU shape: pythia-70m, B=16, 64+32, PPO+critic (~4 min)
    python experiments/bench_iteration.py --tiny              # seconds: a tiny model (the test runs this)
    python experiments/bench_iteration.py --gpu               # paper shape: pythia-1b, B=192, 512+53, bf16, micro 48

Timings on a shared machine are noisy: each figure is reported as best and median of
``--repeats`` iterations, and the load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time

import numpy as np

from experiments import benchenv

PRESETS = {
    # The issue-17 CPU shape (TRL's layout: PPO with a separate critic initialised from the RM).
    "cpu": dict(model="pythia-70m", batch=16, prompt_len=64, new_tokens=32, temperature=0.7, epochs=4,
                minibatches=1, micro_batch=None, score_micro_batch=None, algo="ppo", layout="critic",
                logp="sampler", dtype="float32", repeats=2),
    # Seconds on CPU: the smoke test of this script.
    "tiny": dict(model="tiny", batch=4, prompt_len=8, new_tokens=4, temperature=0.7, epochs=2,
                 minibatches=1, micro_batch=None, score_micro_batch=None, algo="ppo", layout="critic",
                 logp="sampler", dtype="float32", repeats=1),
    # The paper's TL;DR shape on one accelerator: Pythia-1B policy, π_b and reward model, value head.
    "gpu": dict(model="pythia-1b", batch=192, prompt_len=512, new_tokens=53, temperature=0.7, epochs=4,
                minibatches=1, micro_batch=48, score_micro_batch=48, algo="klq", layout="value-head",
                logp="forward", dtype="bfloat16", repeats=2),
}

PHASES = ("sample", "score", "targets", "update", "checkpoint")

# Dense bf16 peak of the accelerators the GPU check may run on (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time one whole KLQ/PPO iteration phase by phase (sample, score, targets, update, "
        "checkpoint), with FLOPs, roofline fractions and optionally TRL's PPOTrainer side by side.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="a tiny random model (seconds; the smoke test)")
    mode.add_argument("--gpu", action="store_true",
                      help="the paper's shape: pythia-1b, B=192, 512-token prompts, 53 new tokens, bf16, "
                      "micro-batch 48, KLQ with a value head")
    p.add_argument("--model", help="Pythia preset (klq_jax.models.gpt_neox.PYTHIA_PRESETS) or 'tiny'")
    p.add_argument("--batch", type=int, help="rollouts per iteration B")
    p.add_argument("--prompt-len", type=int, help="prompt tokens Tq (every prompt full length)")
    p.add_argument("--new-tokens", type=int, help="response tokens T (forced: no stop token is sampled "
                   "in practice from random weights)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--minibatches", type=int, help="minibatches per epoch")
    p.add_argument("--micro-batch", type=int, help="rows per forward/backward (default: the minibatch)")
    p.add_argument("--score-micro-batch", type=int, help="rows per scoring forward (default: all)")
    p.add_argument("--algo", choices=["ppo", "klq"])
    p.add_argument("--layout", choices=["critic", "value-head"],
                   help="critic: TRL's separate value network from the reward model; value-head: the paper's")
    p.add_argument("--logp", choices=["forward", "sampler"],
                   help="θ_old's log π: recomputed by a scoring forward (exact; the GPU preset's) or the "
                   "sampler's own log-probs (TrainConfig.logp_from_sampler; TRL's way, the CPU preset's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype")
    p.add_argument("--repeats", type=int, help="timed iterations after the compiling one")
    p.add_argument("--peer", choices=["none", "trl"], default="none",
                   help="also run TRL's PPOTrainer on the same weights and shapes (needs trl==1.12.0)")
    p.add_argument("--no-checkpoint", action="store_true", help="skip the checkpoint phase")
    p.add_argument("--seed", type=int, default=0)
    benchenv.add_isa_argument(p)
    benchenv.add_malloc_argument(p)
    p.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    args.isa_env = benchenv.cap_isa(args.isa)  # before jax/torch are imported
    preset = PRESETS["tiny" if args.tiny else "gpu" if args.gpu else "cpu"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("batch", "prompt_len", "new_tokens", "epochs", "minibatches", "repeats", "micro_batch",
              "score_micro_batch"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        p.error(f"--temperature must be a finite number > 0, got {args.temperature}")
    if args.batch % args.minibatches:
        p.error(f"--batch {args.batch} must be a multiple of --minibatches {args.minibatches}")
    mb = args.batch // args.minibatches
    args.micro_batch = args.micro_batch or mb
    if mb % args.micro_batch:
        p.error(f"the minibatch ({mb} rows) must be a multiple of --micro-batch {args.micro_batch}")
    if args.peer == "trl" and args.minibatches != 1:
        p.error("--peer trl needs --minibatches 1 (TRL ties its accumulation window to the rollout batch)")
    return args


# --------------------------------------------------------------------------------------------
# The machine
# --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere) and its vector ISA."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == (platform.processor() or platform.machine()):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return f"{name} ({', '.join(isa) or 'no AVX2'})"


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {
        "cpu": cpu_model(),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax": jax.__version__,
        "backend": dev.platform,
        "device": str(dev.device_kind),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    torch_isa=torch.backends.cpu.get_cpu_capability())
    except ImportError:
        pass
    return info


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _best_time(fn, min_time: float = 0.5, min_reps: int = 5) -> float:
    fn()
    best, t_start, n = float("inf"), time.perf_counter(), 0
    while n < min_reps or time.perf_counter() - t_start < min_time:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        n += 1
    return best


def matmul_rate(m: int, k: int, n: int, dtype: str) -> float:
    """Best FLOP/s of a jitted ``[m, k] @ [k, n]`` in ``dtype`` on the default JAX device."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (m, k), jnp.dtype(dtype))
    b = jax.random.normal(kb, (k, n), jnp.dtype(dtype))
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    return 2.0 * m * k * n / _best_time(lambda: f(a, b).block_until_ready())


# A torch GEMM under this many FLOPs (``--tiny``'s) times the call and its threads' wake-up, not
# the multiply: its rate (often "0.0 GFLOP/s" on a loaded machine) says nothing, so it is skipped.
MIN_TORCH_PROBE_FLOPS = 1e8


def torch_matmul_rate(m: int, k: int, n: int) -> float | None:
    """The same GEMM in float32 with torch on the CPU (None without torch)."""
    try:
        import torch
    except ImportError:
        return None
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2.0 * m * k * n / _best_time(lambda: a @ b)


def memory_bandwidth(nbytes: int) -> float:
    """Best bytes/s of a jitted float32 sum over an array of ``nbytes`` (a read-bandwidth probe)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    return nbytes / _best_time(lambda: f(x).block_until_ready())


# --------------------------------------------------------------------------------------------
# FLOPs and bytes from the model shapes
# --------------------------------------------------------------------------------------------


def forward_flops(cfg, rows: int, seq: int, *, keys: int | None = None, logit_positions: int = 0,
                  queries: int | None = None) -> float:
    """FLOPs of one GPT-NeoX forward as klq_jax computes it (multiply-adds count 2).

    ``rows × seq`` tokens through the trunk (QKV, attention output, MLP: ``2·(4D² + 2DF)`` per
    token and layer), attention scores and context against ``keys`` key slots per query (``seq``
    by default: the full square is computed, masked), the unembedding at ``logit_positions`` per
    row (``2·D·V`` each). ``queries``: the last layer computes its query, attention and MLP at
    only that many positions per row (``model(..., queries_from=seq - queries)``; the keys and
    values at all ``seq``). Heads of one output (value, score) and elementwise work are left out.
    """
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    keys = seq if keys is None else keys
    q_last = seq if queries is None else queries
    per_token = 4 * D * D + 2 * D * F  # QKV 3D², attention output D², MLP 2DF (multiply-adds)
    trunk = 2.0 * rows * ((L - 1) * seq * per_token + seq * 2 * D * D + q_last * (2 * D * D + 2 * D * F))
    attention = 2.0 * 2.0 * rows * ((L - 1) * seq + q_last) * keys * D
    unembed = 2.0 * rows * logit_positions * D * V
    return trunk + attention + unembed


def weight_bytes(cfg, dtype_bytes: int, *, unembed: bool = True) -> float:
    """Bytes of the matrices a decode step reads (trunk + unembedding) in the compute dtype."""
    D, F, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.vocab_size
    return dtype_bytes * (L * (4 * D * D + 2 * D * F) + (D * V if unembed else 0))


def phase_work(args, policy_cfg, critic_cfg, rm_cfg) -> dict[str, dict]:
    """``{phase: {"flops": F, "bytes": B}}`` of one iteration (see :func:`forward_flops`).

    sample: prefill over ``B × Tq`` + ``T − 1`` decode steps attending to the whole cache of
    ``Tq + T − 1`` slots; its bytes are what every decode step reads (weights + KV cache), which
    bounds a small-batch decode. score: policy (+ critic), reference and reward-model forwards over
    ``Tq + T`` tokens (logits at the ``T`` response positions, the last layer from the last prompt
    token on). update: ``epochs × B`` rows of forward + backward (3× the forward).
    """
    B, Tq, T = args.batch, args.prompt_len, args.new_tokens
    S, full = Tq + T - 1, Tq + T
    db = 2 if args.dtype == "bfloat16" else 4
    # The prefill's last layer runs its attention output and MLP at the last position only, then
    # the unembedding of that position.
    prefill = forward_flops(policy_cfg, B, Tq, queries=1, logit_positions=1)
    step = forward_flops(policy_cfg, B, 1, keys=S, logit_positions=1)
    kv_bytes = 2.0 * policy_cfg.num_layers * B * S * policy_cfg.hidden_size * db
    sample = {"flops": prefill + (T - 1) * step,
              "bytes": (T - 1) * (weight_bytes(policy_cfg, db) + kv_bytes),
              "step_flops": step, "step_bytes": weight_bytes(policy_cfg, db) + kv_bytes,
              "prefill_flops": prefill}
    # Scoring and training run the last layer from the last prompt token on (T + 1 positions).
    policy = forward_flops(policy_cfg, B, full, logit_positions=T, queries=T + 1)
    critic = forward_flops(critic_cfg, B, full, queries=T + 1) if critic_cfg is not None else 0.0
    # With --logp sampler the scoring pass of the policy computes only the values: the critic alone
    # (no policy forward), or a value head's trunk without the unembedding.
    if args.logp == "sampler":
        own = 0.0 if critic_cfg is not None else forward_flops(policy_cfg, B, full, queries=T + 1)
    else:
        own = policy
    score = own + critic + policy + forward_flops(rm_cfg, B, full, queries=T + 1)
    update = 3.0 * args.epochs * (policy + critic)
    return {"sample": sample, "score": {"flops": score}, "targets": {"flops": 0.0},
            "update": {"flops": update}, "checkpoint": {"flops": 0.0}}


# --------------------------------------------------------------------------------------------
# Models (the same random weights for both libraries)
# --------------------------------------------------------------------------------------------


def _model_config(args):
    from klq_jax.models import gpt_neox

    if args.model == "tiny":
        cfg = gpt_neox.GPTNeoXConfig.tiny()
    else:
        cfg = gpt_neox.GPTNeoXConfig.from_preset(args.model)
    need = args.prompt_len + args.new_tokens
    return cfg.replace(max_position_embeddings=max(cfg.max_position_embeddings, need))


def build_hf_models(args, workdir: str) -> tuple[str, str]:
    """Random ``GPTNeoXForCausalLM`` (policy) and ``GPTNeoXForSequenceClassification`` (reward model)
    of the chosen shape, saved under ``workdir``; returns their directories."""
    import torch
    import transformers

    from klq_jax.models import hf

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = _model_config(args)
    torch.manual_seed(args.seed)
    pad = cfg.vocab_size - 1
    pol_dir, rm_dir = os.path.join(workdir, "policy"), os.path.join(workdir, "reward")
    base = {"pad_token_id": pad, "eos_token_id": 0, "bos_token_id": 0}
    policy = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**hf.config_to_hf(cfg, base=base)))
    policy.save_pretrained(pol_dir)
    rm_cfg = cfg.replace(lm_head=False, score_head=True)
    rm = transformers.GPTNeoXForSequenceClassification(
        transformers.GPTNeoXConfig(**hf.config_to_hf(rm_cfg, base=base)))
    rm.save_pretrained(rm_dir)
    return pol_dir, rm_dir


def build_klq_models(args, pol_dir: str | None, rm_dir: str | None):
    """``(policy graphdef, params, ref graphdef, ref params, reward_fn, configs)`` in ``args``' layout.

    From the saved Hugging Face weights when given (``--peer trl``), else random JAX weights of the
    same shapes (no torch needed).
    """
    import jax
    from flax import nnx

    from klq_jax import rewards
    from klq_jax.models import critic as critic_lib
    from klq_jax.models import gpt_neox
    from klq_jax.models.load import apply_model_options, load_model

    key_v, key_rm = jax.random.split(jax.random.key(args.seed))
    cfg = _model_config(args)
    value_head = args.layout == "value-head"
    if pol_dir is not None:
        pcfg, gd, params = load_model(pol_dir, key=key_v, value_head=value_head, dtype=args.dtype)
        rm_cfg, rm_gd, rm_params = load_model(rm_dir, key=key_rm, dtype=args.dtype)
    else:
        _, params = gpt_neox.init(cfg.replace(value_head=value_head), key_v)
        pcfg, gd, params = apply_model_options(cfg, params, key=key_v, value_head=value_head, dtype=args.dtype)
        rm_cfg0 = cfg.replace(lm_head=False, score_head=True)
        _, rm_params = gpt_neox.init(rm_cfg0, key_rm)
        rm_cfg, rm_gd, rm_params = apply_model_options(rm_cfg0, rm_params, dtype=args.dtype)
    ref_gd, ref_params = gd, jax.tree_util.tree_map(lambda x: x.copy(), params)
    critic_cfg = None
    if args.layout == "critic":
        gd, params = critic_lib.with_critic_from_reward_model(gd, params, rm_gd, rm_params)
        model = nnx.merge(gd, params)  # π_b: a frozen copy of the plain policy
        ref_gd, ref_params = nnx.split(model.policy, nnx.Param)
        ref_params = jax.tree_util.tree_map(lambda x: x.copy(), ref_params)
        critic_cfg = model.critic.config
    reward_fn = rewards.make_rm_reward_fn(rm_gd, rm_params, micro_batch_size=args.score_micro_batch)
    return gd, params, ref_gd, ref_params, reward_fn, (pcfg, critic_cfg, rm_cfg)


def make_prompts(args, vocab_size: int, n: int) -> np.ndarray:
    """``[n, Tq]`` full-length prompts of tokens in ``[1, vocab − 2]`` (no EOS 0, no pad ``vocab − 1``)."""
    rng = np.random.default_rng(args.seed)
    return rng.integers(1, vocab_size - 1, size=(n, args.prompt_len)).astype(np.int32)


# --------------------------------------------------------------------------------------------
# klq_jax: one iteration, phase by phase
# --------------------------------------------------------------------------------------------


class KlqIteration:
    """Runs klq_jax iterations as :func:`klq_jax.train.train` does, timing each phase (synced)."""

    def __init__(self, args, models, prompts: np.ndarray, workdir: str):
        import jax
        from flax import nnx

        from klq_jax import algorithms, sharding
        from klq_jax.algorithms import AlgoConfig
        from klq_jax.checkpoint import Checkpointer
        from klq_jax.train import OptimConfig, TrainConfig, make_optimizer
        from klq_jax.train.step import init_state, jit_update_fn, make_update_fn

        gd, params, self.ref_gd, self.ref_params, self.reward_fn, _ = models
        self.args, self.gd, self.prompts = args, gd, prompts
        n_iter = args.repeats + 1
        self.cfg = TrainConfig(
            algo=AlgoConfig(name=args.algo, tau=0.05),
            optim=OptimConfig(learning_rate=1.41e-5, lr_schedule_unit="iteration", max_grad_norm=None),
            rollouts_per_batch=args.batch, minibatch_size=args.batch // args.minibatches,
            micro_batch_size=args.micro_batch, epochs=args.epochs, total_episodes=args.batch * n_iter,
            max_new_tokens=args.new_tokens, temperature=args.temperature, omega=1.0,
            score_micro_batch_size=args.score_micro_batch, seed=args.seed, out_dir=workdir,
            logp_from_sampler=args.logp == "sampler",
        )
        self.mesh = sharding.make_mesh(devices=jax.devices()[:1])  # one chip (or the whole CPU)
        optimizer, _ = make_optimizer(self.cfg.optim, self.cfg.num_iterations * self.cfg.steps_per_iteration,
                                      self.cfg.steps_per_iteration)
        self.state, state_sh = init_state(params, optimizer, args.seed, self.mesh)
        self.update = jit_update_fn(make_update_fn(gd, self.cfg, optimizer), state_sh, self.mesh)
        algo = algorithms.get(self.cfg.algo.name)
        self.targets_fn = jax.jit(lambda e: algo.targets(self.cfg.algo, e))
        vocab = nnx.merge(self.ref_gd, self.ref_params).config.vocab_size
        self.sampling_cfg = self.cfg.sampling_config((0,), pad_token_id=vocab - 1)
        self.ckpt = None if args.no_checkpoint else Checkpointer(os.path.join(workdir, "klq_ckpt"), keep=1)
        self.times: list[dict] = []

    def step(self) -> dict:
        import jax
        import jax.numpy as jnp

        from klq_jax import rollout, sharding

        it = len(self.times)
        B = self.args.batch
        rows = np.arange(it * B, (it + 1) * B) % len(self.prompts)
        ids = jnp.asarray(self.prompts[rows])
        mask = jnp.ones(ids.shape, jnp.int32)
        phase: dict[str, float] = {}
        t0 = time.perf_counter()
        key = jax.random.fold_in(jax.random.wrap_key_data(self.state.key), 1_000_003)
        ro = rollout.make_rollout(
            self.gd, self.state.params, self.ref_gd, self.ref_params, self.reward_fn, ids, mask, key,
            self.sampling_cfg, omega=self.cfg.omega, micro_batch_size=self.cfg.score_micro_batch_size,
            timings=phase, fuse=False,  # phase by phase (training fuses them into one program)
            logp_from_sampler=self.cfg.logp_from_sampler,
        )
        jax.block_until_ready(ro)
        t1 = time.perf_counter()
        batch = jax.block_until_ready(self.targets_fn(ro.to_batch()))
        t2 = time.perf_counter()
        self.state, metrics = self.update(self.state, sharding.shard_batch(batch, self.mesh))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t3 = time.perf_counter()
        # score: everything after sampling (π/critic and π_b forwards, R_φ, the rewards), as TRL's
        phase["score"] = (t1 - t0) - phase["sample"]
        phase.update(targets=t2 - t1, update=t3 - t2, checkpoint=0.0, iteration=t3 - t0)
        phase["write"] = 0.0
        if self.ckpt is not None:  # as train() saves: asynchronously (the loop waits only for the copy)
            self.ckpt.save(it + 1, self.state, {"iteration": it + 1}, wait=False)
            t4 = time.perf_counter()
            phase["checkpoint"] = t4 - t3
            # The background write is waited for here, outside the iteration's time: train() saves every
            # `save_every` (50) iterations, and a write left running would steal the cores from the next
            # phase timed (or from TRL's iteration with --peer trl, which does not save).
            self.ckpt.finish_pending()
            phase["write"] = time.perf_counter() - t4
        phase["response_tokens"] = float(np.asarray(ro.response_mask).sum())
        self.times.append(phase)
        print(f"  klq_jax iteration {it + 1}: " + ", ".join(f"{k} {phase[k]:.3f}s" for k in PHASES + ("iteration",))
              + f"; background write {phase['write']:.3f}s (not in the iteration); load {load():.1f}", flush=True)
        return phase

    def close(self) -> None:
        if self.ckpt is not None:
            self.ckpt.close()


# --------------------------------------------------------------------------------------------
# TRL's PPOTrainer on the same weights, instrumented per phase
# --------------------------------------------------------------------------------------------


def _wordlevel_tokenizer(vocab_size: int, pad_id: int):
    """A tokenizer of ``vocab_size`` opaque tokens (TRL reads its pad/eos ids; nothing is decoded)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(WordLevel(vocab, unk_token="t1"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=f"t{pad_id}", eos_token="t0",
                                   unk_token="t1")


def run_trl(args, pol_dir: str, rm_dir: str, prompts: np.ndarray, workdir: str, on_step=None) -> list[dict]:
    """Run TRL's PPOTrainer for ``repeats + 1`` iterations; per-iteration phase times.

    Phases are cut at TRL's own function boundaries (module functions patched for timing only):
    sample = ``batch_generation``; score = from there to the end of the last ``get_reward`` (the
    reference forward, the critic and reward-model forwards, log-probs from the generation logits);
    targets = up to the first training forward; update = up to the iteration's ``log`` call.
    ``on_step`` runs in TRL's ``on_step_end`` callback (between iterations, untimed by TRL).
    """
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    import transformers
    from transformers import PrinterCallback, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    events: list[tuple[str, float]] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            events.append((name + ":start", time.perf_counter()))
            out = fn(*a, **kw)
            events.append((name + ":end", time.perf_counter()))
            return out

        return wrapper

    saved = {n: getattr(trl_ppo, n) for n in ("batch_generation", "forward", "get_reward")}
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    load_kw = dict(dtype=dtype)
    policy = transformers.AutoModelForCausalLM.from_pretrained(pol_dir, **load_kw)
    ref = transformers.AutoModelForCausalLM.from_pretrained(pol_dir, **load_kw)
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, **load_kw)
    value = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, **load_kw)
    V = policy.config.vocab_size
    tokenizer = _wordlevel_tokenizer(V, V - 1)
    n = args.batch * (args.repeats + 1)
    ds = datasets.Dataset.from_dict({"input_ids": [list(map(int, r)) for r in prompts[np.arange(n) % len(prompts)]]})

    def collate(rows):
        return {"input_ids": torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)}

    config = PPOConfig(
        output_dir=os.path.join(workdir, "trl"), report_to="none", disable_tqdm=True, logging_steps=1,
        save_strategy="no", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.batch // args.micro_batch, num_mini_batches=1,
        num_ppo_epochs=args.epochs, local_rollout_forward_batch_size=args.score_micro_batch or args.batch,
        response_length=args.new_tokens, temperature=args.temperature, stop_token="eos",
        missing_eos_penalty=1.0, total_episodes=n, num_sample_generations=0, kl_coef=0.05,
        learning_rate=1.41e-5, seed=args.seed, bf16=args.dtype == "bfloat16", use_cpu=not torch.cuda.is_available(),
    )

    out: list[dict] = []

    def cut_iteration():
        """The phases of the iteration whose events were recorded since its ``generate:start``."""
        t = {}
        for name, when in events:
            if name == "generate:start":
                t = {"t0": when}
            elif name == "generate:end":
                t["gen_end"] = when
            elif name in ("reward:end", "ref_fwd:end") and "train_start" not in t:
                t["score_end"] = when
            elif name == "train_fwd:start" and "train_start" not in t:
                t["train_start"] = when
            elif name == "log:start" and "log" not in t:
                t["log"] = when
        end = time.perf_counter()
        events.clear()
        out.append({
            "sample": t["gen_end"] - t["t0"],
            "score": t["score_end"] - t["gen_end"],
            "targets": t["train_start"] - t["score_end"],
            "update": t["log"] - t["train_start"],
            "checkpoint": 0.0,
            "iteration": end - t["t0"],
        })
        print(f"  TRL iteration {len(out)}: " + ", ".join(f"{k} {v:.3f}s" for k, v in out[-1].items())
              + f"; load {load():.1f}", flush=True)

    class StepHook(TrainerCallback):
        def on_step_end(self, *a, **kw):
            cut_iteration()
            if on_step is not None:
                on_step()

    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=rm,
                         value_model=value, train_dataset=ds, eval_dataset=ds.select(range(args.batch)),
                         data_collator=collate, callbacks=[StepHook()])
    trainer.remove_callback(PrinterCallback)  # TRL's per-iteration metrics dict: not ours to print
    train_model = trainer.model
    trl_ppo.batch_generation = timed("generate", saved["batch_generation"])
    trl_ppo.get_reward = timed("reward", saved["get_reward"])

    def forward(model, *a, **kw):
        name = "train_fwd" if model is train_model else "ref_fwd"
        return timed(name, saved["forward"])(model, *a, **kw)

    trl_ppo.forward = forward
    trainer.log = timed("log", trainer.log)
    try:
        trainer.train()
    finally:
        for k, v in saved.items():
            setattr(trl_ppo, k, v)
    return out


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def summarise(iters: list[dict], key: str) -> dict:
    """Best / median over the timed iterations (the first, compiling one, excluded when there are more)."""
    timed = iters[1:] if len(iters) > 1 else iters
    xs = [it[key] for it in timed]
    return {"best": min(xs), "median": float(statistics.median(xs)), "first": iters[0][key], "all": xs}


def main(argv=None):
    args = parse_args(argv)
    args.malloc = benchenv.set_malloc(args.malloc)  # before jax starts its threads
    import jax

    info = machine_info()
    load_start = load()
    print(f"bench_iteration: {args.model} B={args.batch} prompt={args.prompt_len} new={args.new_tokens} "
          f"T={args.temperature} epochs={args.epochs}x{args.minibatches} minibatch(es), micro {args.micro_batch}, "
          f"{args.algo.upper()} with {'a separate critic' if args.layout == 'critic' else 'a value head'}, "
          f"log π_old from the {'sampler' if args.logp == 'sampler' else 'scoring forward'}, "
          f"{args.dtype}; peer: {args.peer}", flush=True)
    print(f"  machine: {info['cpu']}, {info['cpu_count']} cores; jax {info['jax']} on {info['backend']} "
          f"({info['device']}); load {load_start:.2f}"
          + (f"; XLA_FLAGS={info['xla_flags']}" if info["xla_flags"] else "")
          + (f"; torch ISA {info['torch_isa']}" if info.get("torch_isa") else "")
          + f"; malloc {args.malloc}", flush=True)

    # The machine's rates, measured on a GEMM of the model's own shape.
    cfg = _model_config(args)
    tokens = min(args.micro_batch * (args.prompt_len + args.new_tokens), 8192)
    gemm_shape = (tokens, cfg.hidden_size, cfg.intermediate_size)
    on_gpu = jax.devices()[0].platform == "gpu"
    rates = {"jax_gemm": matmul_rate(*gemm_shape, args.dtype),
             "mem_bw": memory_bandwidth(1 << 30 if on_gpu else 1 << 28)}
    torch_part = ""
    if not on_gpu and 2.0 * gemm_shape[0] * gemm_shape[1] * gemm_shape[2] < MIN_TORCH_PROBE_FLOPS:
        torch_part = ", torch not measured (too small a GEMM to time)"
    elif not on_gpu:
        rates["torch_gemm"] = torch_matmul_rate(*gemm_shape)
        torch_part = f", torch {rates['torch_gemm'] / 1e9:.1f} GFLOP/s" if rates["torch_gemm"] else ""
    print(f"  GEMM {gemm_shape[0]}x{gemm_shape[1]}x{gemm_shape[2]} {args.dtype}: jax {rates['jax_gemm'] / 1e9:.1f} "
          f"GFLOP/s{torch_part}; memory read {rates['mem_bw'] / 1e9:.1f} GB/s", flush=True)

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        pol_dir = rm_dir = None
        if args.peer == "trl":
            pol_dir, rm_dir = build_hf_models(args, workdir)
        models = build_klq_models(args, pol_dir, rm_dir)
        pcfg, critic_cfg, rm_cfg = models[5]
        prompts = make_prompts(args, pcfg.vocab_size, args.batch * (args.repeats + 1))
        klq = KlqIteration(args, models, prompts, workdir)
        print(f"  built the models in {time.perf_counter() - t0:.1f}s", flush=True)
        trl_iters = None
        if args.peer == "trl":
            trl_iters = run_trl(args, pol_dir, rm_dir, prompts, workdir, on_step=klq.step)
            while len(klq.times) < args.repeats + 1:
                klq.step()
        else:
            for _ in range(args.repeats + 1):
                klq.step()
        klq.close()
        peak_mem = None
        stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
        if stats:
            peak_mem = stats.get("peak_bytes_in_use")

    # A second rate measurement (load drifts): the roofline uses the best of the two.
    rates["jax_gemm"] = max(rates["jax_gemm"], matmul_rate(*gemm_shape, args.dtype))
    load_end = load()
    work = phase_work(args, pcfg, critic_cfg, rm_cfg)
    res = {"setup": {k: getattr(args, k) for k in ("model", "batch", "prompt_len", "new_tokens", "temperature",
                                                   "epochs", "minibatches", "micro_batch", "score_micro_batch",
                                                   "algo", "layout", "logp", "dtype", "repeats", "peer", "isa", "malloc")},
           "machine": dict(info, load_start=load_start, load_end=load_end), "rates": rates,
           "klq": {}, "trl": {}, "ratio": {}, "peak_bytes": peak_mem}

    gemm, bw = rates["jax_gemm"], rates["mem_bw"]
    print(f"\nphase       klq_jax best / median   compile    GFLOP   roofline   fraction"
          + ("      TRL best / median   TRL/klq" if trl_iters else ""))
    for ph in PHASES + ("iteration",):
        s = summarise(klq.times, ph)
        s["compile"] = max(s["first"] - s["median"], 0.0)
        w = work.get(ph, {"flops": sum(work[p]["flops"] for p in PHASES)})
        if ph == "sample":
            roof = w["prefill_flops"] / gemm + (args.new_tokens - 1) * max(w["step_flops"] / gemm,
                                                                            w["step_bytes"] / bw)
        elif ph == "iteration":
            roof = sum(res["klq"][p]["roofline_s"] for p in PHASES)
        else:
            roof = w["flops"] / gemm
        s.update(flops=w["flops"], roofline_s=roof, fraction=roof / s["best"] if s["best"] > 0 and roof else None)
        res["klq"][ph] = s
        line = (f"{ph:<11} {s['best']:8.3f}s / {s['median']:7.3f}s {s['compile']:8.2f}s {w['flops'] / 1e9:8.3g} "
                f"{roof:8.3f}s   " + (f"{s['fraction']:6.1%}" if s["fraction"] else "     —"))
        if trl_iters:
            t = summarise(trl_iters, ph)
            res["trl"][ph] = t
            ratio = t["best"] / s["best"] if s["best"] > 0 and t["best"] > 0 else None
            res["ratio"][ph] = ratio
            line += f"   {t['best']:8.3f}s / {t['median']:7.3f}s" + (f"   {ratio:6.2f}x" if ratio else "      —")
        print(line)
    B = args.batch
    eps = B / res["klq"]["iteration"]["best"]
    res["klq"]["episodes_per_s"] = eps
    line = f"episodes/s  {eps:8.2f} (best)"
    if trl_iters:
        teps = B / res["trl"]["iteration"]["best"]
        res["trl"]["episodes_per_s"] = teps
        line += f"; TRL {teps:.2f}; ratio {eps / teps:.2f}x"
    print(line)
    upd = res["klq"]["update"]
    print(f"update: {upd['flops'] / upd['best'] / 1e9:.1f} GFLOP/s = {upd['fraction']:.1%} of the measured GEMM rate "
          f"({gemm / 1e9:.1f} GFLOP/s)")
    if on_gpu:
        kind = info["device"]
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in kind), None)
        mfu = upd["flops"] / upd["best"] / peak if peak else None
        res["klq"]["update_mfu"] = mfu
        print(f"update MFU: " + (f"{mfu:.1%} of {peak / 1e12:.0f} TFLOP/s bf16 ({kind})" if mfu else
                                 f"unknown peak for {kind}") + f"; peak memory "
              + (f"{peak_mem / 2**30:.1f} GiB" if peak_mem else "n/a"))
    from klq_jax.config import TrainConfig

    write = summarise(klq.times, "write")
    res["klq"]["checkpoint_write"] = write
    if args.no_checkpoint:
        print(f"checkpoint: not measured (--no-checkpoint); load {load_start:.2f} -> {load_end:.2f}")
    else:
        print(f"checkpoint: the loop waits {res['klq']['checkpoint']['best']:.3f}s per save; the background "
              f"write then takes {write['best']:.3f}s (waited for outside the iteration's time; train() saves "
              f"every {TrainConfig.save_every} iterations by default); load {load_start:.2f} -> {load_end:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=float)
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
