"""Tiny checkpoints and batches shared by the tests (and handy for demos).

Everything here runs offline on CPU. The Hugging Face builders need ``torch`` and ``transformers``
(the ``test`` extra); they are imported lazily, so importing this module never needs torch.

Stable names (other tests import them):

* :func:`tiny_hf_gpt_neox` — save a tiny random ``GPTNeoXForCausalLM`` and return the torch model.
* :func:`tiny_hf_gpt_neox_reward` — the same for ``GPTNeoXForSequenceClassification(num_labels=1)``.
* :func:`make_left_padded_batch` — random left-padded ``tokens [B, T]`` and ``mask [B, T]``.
* :func:`position_ids` — ``max(cumsum(mask) - 1, 0)``, the positions our model uses (pass them to HF).
* :func:`hf_forward` — run a torch HF model on a (left-padded) numpy batch, return float32 numpy.
* :data:`TINY_HF_CONFIG` — the default tiny HF config values.
* :func:`snapshot` — every file under a directory with its bytes (to assert nothing changed).
* :func:`read_only` — make a directory refuse new entries, as a read-only mount does.
* :func:`held_by_another_process` — a directory's run lock held by another live process.

Example::

    >>> import tempfile, numpy as np
    >>> from tests.helpers.testing import tiny_hf_gpt_neox, make_left_padded_batch
    >>> d = tempfile.mkdtemp()
    >>> model = tiny_hf_gpt_neox(d, num_attention_heads=3, hidden_size=24)
    >>> tokens, mask = make_left_padded_batch(np.random.default_rng(0), 2, 6, 64, [6, 3])
    >>> mask.tolist()
    [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Sequence

import numpy as np

__all__ = [
    "TINY_HF_CONFIG",
    "tiny_hf_gpt_neox",
    "tiny_hf_gpt_neox_reward",
    "tiny_hf_llama",
    "tiny_hf_distilbert",
    "make_left_padded_batch",
    "position_ids",
    "hf_forward",
]

# Defaults for the tiny HF GPT-NeoX checkpoints (transformers' GPTNeoXConfig keyword names).
TINY_HF_CONFIG: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=128,
    use_parallel_residual=True,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=0,
)


def _randomise(model, seed: int, init_std: float):
    """Overwrite every parameter with seeded noise large enough that mapping mistakes show up.

    HF's default init (std 0.02, zero biases, unit LayerNorm) makes logits nearly constant, which
    would hide a wrong transpose or a dropped bias.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            low = name.lower()
            if "layernorm" in low or "layer_norm" in low or low.endswith(("norm.weight", "norm.bias")):
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(init_std * noise)


def _build_hf(cls_name: str, config_cls_name: str, directory, seed, init_std, kwargs):
    """``transformers.<cls_name>(<config_cls_name>(**kwargs))``, randomised, in eval mode, saved."""
    import warnings

    import torch
    import transformers

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, cls_name)(getattr(transformers, config_cls_name)(**kwargs))
    _randomise(model, seed, init_std)
    model.eval()
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
        model.save_pretrained(directory)
    return model


def _build(cls, directory, seed, init_std, overrides, extra):
    return _build_hf(cls.__name__, "GPTNeoXConfig", directory, seed, init_std,
                     {**TINY_HF_CONFIG, **extra, **overrides})


def tiny_hf_gpt_neox(directory=None, *, seed: int = 0, init_std: float = 0.2, **config_overrides):
    """Save a tiny random ``transformers.GPTNeoXForCausalLM`` to ``directory``; return it (eval mode).

    Args:
      directory: where ``save_pretrained`` writes (``config.json`` + ``model.safetensors``); None to
        only build the model.
      seed: torch seed of the weights.
      init_std: std of the weight matrices (LayerNorms get ``1 + 0.1 N(0,1)``, biases ``0.1 N(0,1)``).
      **config_overrides: ``transformers.GPTNeoXConfig`` keywords over :data:`TINY_HF_CONFIG`
        (e.g. ``use_parallel_residual=False``, ``rotary_pct=1.0``, ``num_attention_heads=3``).

    Example::

        >>> m = tiny_hf_gpt_neox("/tmp/tiny-neox", hidden_size=20, num_attention_heads=5)  # doctest: +SKIP
    """
    from transformers import GPTNeoXForCausalLM

    return _build(GPTNeoXForCausalLM, directory, seed, init_std, config_overrides, {})


def tiny_hf_gpt_neox_reward(
    directory=None, *, seed: int = 0, init_std: float = 0.2, pad_token_id: int = 0, **config_overrides
):
    """Save a tiny random ``GPTNeoXForSequenceClassification(num_labels=1)`` (a reward model).

    ``pad_token_id`` (default 0) is what HF uses to find each row's last real token, so batches
    from :func:`make_left_padded_batch` (pad 0, real tokens ≥ 1) agree with a mask-based read-out.

    Example::

        >>> rm = tiny_hf_gpt_neox_reward("/tmp/tiny-rm")                            # doctest: +SKIP
    """
    from transformers import GPTNeoXForSequenceClassification

    extra = dict(num_labels=1, pad_token_id=pad_token_id)
    return _build(GPTNeoXForSequenceClassification, directory, seed, init_std, config_overrides, extra)


# Defaults for the tiny HF Llama checkpoints (transformers' LlamaConfig keyword names).
TINY_HF_LLAMA_CONFIG: dict[str, Any] = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# llama3 rope scaling whose three frequency bands all occur in a tiny model (head_dim 8, θ 10^4:
# wavelengths 6.3, 63, 628, 6283 against the band edges 16/4 and 16/1).
TINY_LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
}


def tiny_hf_llama(directory=None, *, seed: int = 0, init_std: float = 0.2, cls: str = "LlamaForCausalLM",
                  **config_overrides):
    """Save a tiny random ``transformers`` Llama (``cls``) to ``directory``; return it (eval mode).

    ``**config_overrides`` are ``transformers.LlamaConfig`` keywords over
    :data:`TINY_HF_LLAMA_CONFIG` (e.g. ``num_key_value_heads=4``,
    ``rope_parameters=TINY_LLAMA3_ROPE``, ``tie_word_embeddings=True``).
    """
    return _build_hf(cls, "LlamaConfig", directory, seed, init_std, {**TINY_HF_LLAMA_CONFIG, **config_overrides})


TINY_HF_DISTILBERT_CONFIG: dict[str, Any] = dict(
    vocab_size=64, max_position_embeddings=32, dim=32, n_layers=2, n_heads=4, hidden_dim=48,
    id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1}, pad_token_id=0,
)


def tiny_hf_distilbert(directory=None, *, seed: int = 0, init_std: float = 0.2, **config_overrides):
    """Save a tiny random ``DistilBertForSequenceClassification`` (NEGATIVE/POSITIVE); return it.

    ``**config_overrides`` are ``transformers.DistilBertConfig`` keywords over
    :data:`TINY_HF_DISTILBERT_CONFIG`.
    """
    return _build_hf("DistilBertForSequenceClassification", "DistilBertConfig", directory, seed, init_std,
                     {**TINY_HF_DISTILBERT_CONFIG, **config_overrides})


def make_left_padded_batch(rng, B: int, T: int, vocab: int, lengths: Sequence[int]):
    """Random left-padded ``tokens [B, T]`` (int32, ids in ``[1, vocab)``, pad 0) and ``mask [B, T]``.

    Args:
      rng: ``np.random.Generator`` (or an int seed).
      B, T: batch size and padded length.
      vocab: vocabulary size (real tokens avoid 0, the pad id).
      lengths: ``B`` real lengths, each in ``[0, T]``; row ``b`` has ``T - lengths[b]`` pads on the left.

    Returns:
      ``(tokens, mask)`` numpy int32 arrays.

    Example::

        >>> t, m = make_left_padded_batch(0, 2, 4, 10, [4, 2]); m.tolist()
        [[1, 1, 1, 1], [0, 0, 1, 1]]
    """
    rng = np.random.default_rng(rng)
    lengths = list(lengths)
    if len(lengths) != B or any(not 0 <= n <= T for n in lengths):
        raise ValueError(f"lengths must be {B} ints in [0, {T}]; got {lengths}")
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2 (0 is the pad id); got {vocab}")
    mask = (np.arange(T)[None, :] >= (T - np.asarray(lengths))[:, None]).astype(np.int32)
    tokens = rng.integers(1, vocab, size=(B, T)).astype(np.int32) * mask
    return tokens, mask


def position_ids(mask) -> np.ndarray:
    """``max(cumsum(mask) - 1, 0)`` ``[B, T]`` int64: the position ids of our model, for HF."""
    mask = np.asarray(mask)
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)


def hf_forward(model, tokens, mask) -> np.ndarray:
    """Float32 numpy logits of a torch HF model on a left-padded batch (positions from the mask).

    Returns ``[B, T, V]`` for a causal LM, ``[B, num_labels]`` for a sequence classifier.
    """
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long),
            attention_mask=torch.as_tensor(np.asarray(mask), dtype=torch.long),
            position_ids=torch.as_tensor(position_ids(mask)),
        )
    return out.logits.float().numpy()


def wait_for_stderr_line(proc, wanted: str) -> None:
    """Read a ``subprocess.Popen``'s text stderr until a line equals ``wanted``.

    No deadline (a loaded machine is slow, not wrong): if the process exits first, fail naming the
    line it waited for, with its last 20 lines of stderr.
    """
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.strip() == wanted:
            return
    proc.wait()
    raise AssertionError(f"the process exited (rc {proc.returncode}) before printing {wanted!r}:\n"
                         + "".join(seen[-20:]))


@contextlib.contextmanager
def held_by_another_process(path):
    """``path``'s run lock held by another process (as a live demo or training run holds it) until
    the block ends, yielding its pid; the process then exits without releasing it, leaving a dead
    holder's stale lock file."""
    code = ("import sys; from klq_jax.train import run_dir; run_dir.RunLock.acquire(sys.argv[1]); "
            "print('locked', file=sys.stderr, flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_stderr_line(proc, "locked")
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stderr.close()


def tiny_klq_state_target(sharding=None):
    """The abstract ``TrainState`` of a ``tiny-klq`` run (``ShapeDtypeStruct`` leaves, placed by
    ``sharding`` when given): the target to restore its checkpoints into."""
    import jax

    from experiments import presets, tasks
    from klq_jax import train

    cfg = presets.get("tiny-klq")
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    opt, _ = train.make_optimizer(cfg.optim, 1)
    target = jax.eval_shape(
        lambda p: train.TrainState(p, opt.init(p), jax.numpy.zeros((), jax.numpy.int32),
                                   jax.random.key_data(jax.random.key(0))), exp.params)
    if sharding is not None:
        target = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target)
    return target


def cpu_env(devices: int) -> dict[str, str]:
    """Environment variables that give a subprocess ``devices`` simulated CPU devices, compiling at
    LLVM optimisation level 0 like the tests' own process (``tests/conftest.py``): a tiny run's
    programs compile about a third faster and still run in little time."""
    return dict(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        JAX_PLATFORMS="cpu",
    )


def compile_cache_env(cache_dir) -> dict[str, str]:
    """Environment variables that give a subprocess JAX's persistent compilation cache in
    ``cache_dir``, storing every program (no minimum compile time or size): the processes of one
    test that run the same programs then compile them once."""
    return dict(
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def metrics_without_timings(out_dir) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``, without the wall-clock timing fields."""
    import json

    from klq_jax.train.loop import TIMING_KEYS

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def snapshot(d) -> dict[str, bytes]:
    """Every file under the directory ``d`` (relative path → bytes): what "the data is preserved"
    means in the run-safety tests. Symbolic links to directories are not followed."""
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, d)] = fh.read()
    return out


@contextlib.contextmanager
def read_only(directory):
    """While in the block, creating a directory anywhere under ``directory`` fails: ``chmod 0o555``
    for a user whom modes bind, else (root ignores them) ``os.mkdir`` raising ``EROFS`` there, as
    on a read-only mount (``os.makedirs`` and ``Path.mkdir`` go through ``os.mkdir``)."""
    import errno

    directory = os.path.abspath(directory)
    if os.geteuid() != 0:
        mode = os.stat(directory).st_mode & 0o7777
        os.chmod(directory, 0o555)
        try:
            yield
        finally:
            os.chmod(directory, mode)
        return
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        p = os.path.abspath(os.fspath(path))
        if p == directory or p.startswith(directory + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, *args, **kwargs)

    os.mkdir = mkdir
    try:
        yield
    finally:
        os.mkdir = real


def flip_one_bit_in_checkpoint(step_dir, prefix: str = "params.") -> tuple[str, np.ndarray, np.ndarray]:
    """Flip the lowest bit of one element of one floating array saved in the orbax checkpoint
    ``step_dir`` (``<checkpoints>/<step>``): the first array whose name starts with ``prefix``.

    Orbax stores each array as a zstd-compressed zarr chunk inside an OCDBT database
    (``state/manifest.ocdbt`` + ``state/**/d/*`` data files); flipping a bit of the compressed bytes
    would mostly make the chunk undecodable (structural damage, caught already). This rewrites the
    chunk through tensorstore itself, with one value changed: the file set then holds a valid,
    decodable array that differs from the saved one by one bit — the silent damage a checksum must
    catch. Returns ``(orbax array name, before, after)``.
    """
    import tensorstore as ts

    base = "file://" + os.path.join(os.fspath(step_dir), "state") + "/"
    kv = ts.KvStore.open({"driver": "ocdbt", "base": base}).result()
    names = sorted(k.decode()[: -len("/.zarray")] for k in kv.list().result() if k.endswith(b"/.zarray"))
    for name in names:
        if not name.startswith(prefix):
            continue
        arr = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": base, "path": name + "/"}}).result()
        if arr.dtype.numpy_dtype.kind != "f" and "bfloat16" not in str(arr.dtype):
            continue
        before = arr.read().result()
        after = before.copy()
        words = after.reshape(-1).view(f"uint{8 * after.dtype.itemsize}")
        words[words.size // 2] ^= 1
        arr.write(after).result()
        return name, before, after
    raise AssertionError(f"no floating array named {prefix}* in {step_dir}: {names}")
