"""Tasks: how a :class:`TaskConfig` becomes a :class:`klq_jax.train.Experiment` (models, prompts, reward).

:func:`build_experiment` is the one task builder. ``kind="synthetic"``: a random or given policy,
random prompts over its vocabulary and a programmatic reward (:func:`klq_jax.rewards.programmatic_reward`;
no tokenizer, no network) — for tests and CPU smoke runs. ``"tldr"``, ``"hh"``, ``"imdb"``: the
paper's experiments (§5, App. D Tables 1-2; presets in :mod:`experiments.presets`):

* **policy** θ_0: the SFT model (``TaskConfig.policy``) with a randomly initialised value head
  (paper §3.2); **reference** π_b: ``TaskConfig.reference`` loaded without value head, or (when
  None) the trainer's frozen copy of θ_0;
* **tokenizer**: ``AutoTokenizer.from_pretrained(task.tokenizer or task.policy)``; when it has no
  pad token, ``"[PAD]"`` is added as TRL / the N+ details do (rlhf_facts.md §1), and the pad id must
  be a row of the policy's embedding (Pythia: 50304 rows > 50277 tokens, so ``[PAD]`` = 50277 fits);
  the stop token is the tokenizer's EOS (Pythia ``<|endoftext|>`` = 0);
* **prompts**: :func:`~klq_jax.data.load_tldr` (``query_length = task.max_prompt_len``),
  :func:`~klq_jax.data.load_hh` (subset ``task.dataset_subset``, single-turn unless
  ``task.hh_single_turn`` is False, prompts over
  ``task.max_prompt_len`` tokens dropped) or :func:`~klq_jax.data.load_imdb`, served by a
  :class:`~klq_jax.data.PromptIterator` seeded with ``seed`` (its position is checkpointed);
* **reward** ``R_φ`` by the reward model's ``config.json`` architecture:

  - ``GPTNeoXForSequenceClassification`` (TL;DR's ``cleanrl/..._reward__tldr``) sharing the
    policy's tokenizer (``task.reward_tokenizer`` unset): ids straight in,
    :func:`klq_jax.rewards.make_rm_reward_fn`;
  - ``GPT2ForSequenceClassification`` (HH's ``Ray2333/gpt2-large-helpful-reward_model``), or any
    score model with ``task.reward_tokenizer`` set: decode, re-tokenise with the RM's tokenizer
    (``task.reward_tokenizer`` or the RM's directory), score
    (:class:`klq_jax.rewards.CrossTokenizerRewardFn`; HH uses the RM's ``tokenizer(q, a)`` pair
    format, TL;DR/IMDb the concatenated text);
  - ``DistilBertForSequenceClassification`` (IMDb's ``lvwerra/distilbert-imdb``): decode the
    policy's prompt + response, concatenate them into the review text, re-tokenise with the
    DistilBERT tokenizer (``[CLS] … [SEP]``) and take the logit of ``task.reward_label``
    (``"POSITIVE"``, its id from the model's ``config.label2id``), as TRL's sentiment example;
  - anything else: a clear error says which architectures are supported.

Hub names: every model and dataset name goes through :func:`klq_jax.models.load.resolve_source`, so with
``KLQ_LOCAL_MODELS=/dir`` a name ``org/name`` reads ``/dir/org/name`` when it exists (models in the
Hugging Face layout, datasets in the hub repo's file layout); otherwise models are downloaded from
the Hub and datasets go through ``datasets.load_dataset``. Without network, a missing copy raises
an error naming ``KLQ_LOCAL_MODELS``.

Example (offline, with tiny local copies under the hub names; see tests/test_paper_presets.py)::

    >>> from experiments import presets, tasks                                     # doctest: +SKIP
    >>> exp = tasks.build_experiment(presets.get("hh-klq").task, batch_size=192, seed=0)  # doctest: +SKIP
    >>> batch = next(exp.prompts); batch["prompt_ids"].shape                         # doctest: +SKIP
    (192, 112)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from klq_jax import rewards, sharding
from klq_jax.errors import ConfigError, SourceNotFoundError
from klq_jax.data import PromptDataset, PromptIterator, load_hh, load_imdb, load_tldr
from klq_jax.models.load import attach_critic, load_model, resolve_source
from experiments.config import RunConfig, TaskConfig
from klq_jax.train import Experiment

logger = logging.getLogger(__name__)

__all__ = [
    "TaskConfig",
    "RunConfig",
    "build_experiment",
    "check_sources",
    "synthetic_prompts",
    "heldout_synthetic_prompts",
    "load_validation_prompts",
    "DEFAULT_EVAL_SPLITS",
    "VALIDATION_SEED",
    "DEFAULT_DATASETS",
    "DEFAULT_SCORE_MICRO_BATCH_SIZE",
    "load_policy_tokenizer",
    "load_prompts",
    "load_reward_fn",
    "load_reward_model",
]

# The held-out split of each dataset (hh-rlhf and IMDb have no validation split).
DEFAULT_EVAL_SPLITS = {"tldr": "validation", "hh": "test", "imdb": "test"}

DEFAULT_DATASETS = {
    "tldr": "vwxyzjn/summarize_from_feedback_tldr_3_filtered_oai_preprocessing_1706381144",
    "hh": "Anthropic/hh-rlhf",
    "imdb": "stanfordnlp/imdb",
}

# Seeds the choice of the validation prompts (and IMDb's validation prefix lengths): a constant,
# so that every run of a dataset validates on the same prompts whatever its --seed.
VALIDATION_SEED = 0

# Rows per reward-model forward pass (TrainConfig.score_micro_batch_size of the paper presets).
DEFAULT_SCORE_MICRO_BATCH_SIZE = 48

_PAD_TOKEN = "[PAD]"


def synthetic_prompts(num_prompts: int, max_len: int, vocab_size: int, seed: int, pad_id: int = 0):
    """Random left-padded prompts of lengths 1..max_len over tokens ``1..vocab_size-1``."""
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


def heldout_synthetic_prompts(train, num_prompts: int, max_len: int, vocab_size: int, seed: int,
                              pad_id: int = 0):
    """``num_prompts`` synthetic prompts (as :func:`synthetic_prompts`) none of which is a training
    prompt of ``train`` (nor repeated), drawn from a seed apart from the training set's.

    Raises:
      ValueError: the prompt space is too small to hold that many new prompts.
    """
    seen = {tuple(r[m > 0].tolist()) for r, m in zip(train.prompt_ids, train.prompt_mask)}
    keep: list[int] = []
    candidates = synthetic_prompts(4 * num_prompts + 64, max_len, vocab_size, seed + 1_000_003, pad_id)
    for i, (r, m) in enumerate(zip(candidates.prompt_ids, candidates.prompt_mask)):
        t = tuple(r[m > 0].tolist())
        if t not in seen:
            seen.add(t)
            keep.append(i)
        if len(keep) == num_prompts:
            return dataclasses.replace(candidates.select(keep), name="synthetic-heldout")
    raise ValueError(
        f"Could not draw {num_prompts} held-out synthetic prompts disjoint from the {len(train)} "
        f"training prompts (prompt_len={max_len}, vocabulary {vocab_size}); lower eval_prompts or "
        "raise task.prompt_len."
    )


def load_validation_prompts(task: "TaskConfig", tokenizer, num_prompts: int):
    """``num_prompts`` prompts of the task's held-out split (``task.eval_split`` or
    :data:`DEFAULT_EVAL_SPLITS`), a :class:`klq_jax.data.PromptDataset` (real datasets only).

    The same prompts for every run of a dataset, whatever its training seed: the first
    ``num_prompts`` of a permutation of the split's usable prompts drawn from
    :data:`VALIDATION_SEED` (not the file's first rows: stanfordnlp/imdb's splits are sorted by
    label), IMDb's prefix lengths drawn from the same constant seed. Fewer usable prompts than
    ``num_prompts``: all of them, with a warning naming both counts.
    """
    split = task.eval_split or DEFAULT_EVAL_SPLITS[task.kind]
    if split == task.split:
        raise ValueError(
            f"task.eval_split={split!r} is the training split: validation needs held-out prompts; "
            f"set --task.eval-split to another split."
        )
    ds = load_prompts(dataclasses.replace(task, split=split), tokenizer, seed=VALIDATION_SEED)
    if len(ds) == 0:
        raise ValueError(f"The {split!r} split of {ds.name} has no usable prompts for validation.")
    if num_prompts > len(ds):
        logger.warning("validation: %d prompts requested (--eval-prompts) but %s has only %d usable "
                       "held-out prompts: validating on %d", num_prompts, ds.name, len(ds), len(ds))
    order = np.random.default_rng(VALIDATION_SEED).permutation(len(ds))
    return ds.select(order[: min(num_prompts, len(ds))])


def _local_models_state() -> str:
    """``KLQ_LOCAL_MODELS``'s state for an error message: unset, a missing directory, or its value."""
    root = os.environ.get("KLQ_LOCAL_MODELS")
    if not root:
        return "KLQ_LOCAL_MODELS is not set"
    return f"KLQ_LOCAL_MODELS={root}" + ("" if os.path.isdir(root) else ", a directory that does not exist")


def _offline_hint(name: str, what: str) -> str:
    root = os.environ.get("KLQ_LOCAL_MODELS")
    where = f"/dir/{name}" if not root else os.path.join(root, name)
    state = "KLQ_LOCAL_MODELS is not set" if not root else f"looked for {where}"
    if root and not os.path.isdir(root):
        state = _local_models_state()
    return (
        f"Without network access, set KLQ_LOCAL_MODELS=/dir and put a copy of the {what} at "
        f"/dir/{name} ({state})."
    )


def _is_connection_error(err: BaseException | None) -> bool:
    while err is not None:
        name = type(err).__name__
        if isinstance(err, ConnectionError) or "Connect" in name or "Offline" in name or "Timeout" in name:
            return True
        err = err.__cause__ or err.__context__
    return False


def _hub_unreachable() -> str | None:
    """Why the Hugging Face Hub cannot be reached, or None when it answers.

    One request with a 10 s timeout and no retries (``huggingface_hub`` retries five times with
    backoff, ~25 s of warnings, when the network is down); ``HF_HUB_OFFLINE=1`` skips it.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=10)
    except Exception as err:  # no network, DNS failure, a closed port, a timeout
        return f"the Hugging Face Hub ({constants.ENDPOINT}) did not answer: {type(err).__name__}"
    return None


def _source_problem(name: str, kind: str, state: dict) -> str | None:
    """Why ``name`` (a model/tokenizer or a dataset) cannot be had, or None when it can.

    ``state["offline"]`` is set when the Hub did not answer (:func:`_hub_unreachable`) or after the
    first connection failure: sources are then looked up in the local caches only (no network
    retries).
    """
    if name.startswith("random:") or os.path.exists(name):
        return None
    if os.path.exists(resolve_source(name, kind="dataset")):  # a KLQ_LOCAL_MODELS copy
        return None
    if kind == "model":
        if state.get("offline"):
            try:
                from huggingface_hub import snapshot_download

                snapshot_download(name, local_files_only=True)
                return None
            except Exception as err:
                return type(err).__name__
        try:
            resolve_source(name)
            return None
        except FileNotFoundError as err:
            state["offline"] = _is_connection_error(err)
            return str(err).splitlines()[0]
    if state.get("offline") and os.environ.get("HF_DATASETS_OFFLINE", "0") in ("0", "", "false"):
        return "offline"
    try:  # works from the datasets cache offline; fails fast without network and cache
        import datasets

        datasets.load_dataset_builder(name)
        return None
    except Exception as err:
        state["offline"] = state.get("offline") or _is_connection_error(err)
        return type(err).__name__


def _looks_like_path(name: str) -> bool:
    """A local path (absolute, ``./``, ``../``, ``~``), never a hub name ``org/name``."""
    return os.path.isabs(name) or name.startswith(("./", "../", "~", ".\\"))


def check_sources(task: TaskConfig) -> None:
    """Check every model, tokenizer and dataset source of ``task`` before loading any of them.

    Raises:
      SourceNotFoundError: naming ALL the sources that are neither local (``KLQ_LOCAL_MODELS``
        included) nor downloadable, with what to do.
    """
    wanted: list[tuple[str, str, str]] = []
    for role, name in (("policy", task.policy), ("reference", task.reference),
                       ("reward_model", task.reward_model), ("tokenizer", task.tokenizer),
                       ("reward_tokenizer", task.reward_tokenizer),
                       ("critic", None if task.critic in (None, "reward_model") else task.critic)):
        if name is not None:
            wanted.append((role, name, "model"))
    if task.kind != "synthetic":
        wanted.append(("dataset", task.dataset or DEFAULT_DATASETS[task.kind], "dataset"))
    typos = [f"{role} {name!r}" for role, name, _ in wanted if _looks_like_path(name) and not os.path.exists(name)]
    if typos:
        raise SourceNotFoundError(f"No such path: {', '.join(typos)}; fix the path (a local path must exist).")
    missing, seen, state = [], {}, {}
    needs_hub = [name for _, name, _ in wanted
                 if not (name.startswith("random:") or os.path.exists(resolve_source(name, kind="dataset")))]
    hub_problem = _hub_unreachable() if needs_hub else None
    state["offline"] = hub_problem is not None
    for role, name, kind in wanted:
        if (name, kind) not in seen:
            seen[(name, kind)] = _source_problem(name, kind, state)
        if seen[(name, kind)] is not None:
            missing.append(f"{role} {name!r}")
    if missing:
        offline = "" if hub_problem is None else (
            f" ({hub_problem}; set HF_HUB_OFFLINE=1 to skip the Hub)" if "HF_HUB_OFFLINE" not in hub_problem
            else " (HF_HUB_OFFLINE is set: only local copies and the local Hub cache count)")
        raise SourceNotFoundError(
            f"{len(missing)} source(s) are neither local nor downloadable: {', '.join(missing)}{offline}. "
            f"Without network access, set KLQ_LOCAL_MODELS=/dir and put a copy of each at "
            f"/dir/<name> ({_local_models_state()}; datasets in the hub repo's file layout), or pass local paths."
        )


def load_policy_tokenizer(source: str, *, vocab_size: int | None = None, pad_with_eos: bool = False):
    """The policy's tokenizer, with a pad token (``"[PAD]"`` added when missing, as TRL does).

    Args:
      source: a tokenizer directory or hub name (resolved by :func:`klq_jax.resolve_source`).
      vocab_size: rows of the policy's embedding; every token id, the new pad id included, must be
        below it.
      pad_with_eos: when the tokenizer has no pad token and ``"[PAD]"`` would not fit the
        embedding (Llama 3.2: 128256 tokens, 128256 rows), use the EOS token as the pad, as TRL's
        sentiment example does (padding is masked everywhere, its id never matters).

    Raises:
      ValueError: the tokenizer has no EOS token, or more tokens than the embedding has rows.

    Example::

        >>> import tempfile
        >>> make_tiny_gpt2_tokenizer = fixtures.make_tiny_gpt2_tokenizer  # test helpers (tests/helpers/fixtures.py)
        >>> d = tempfile.mkdtemp(); _ = make_tiny_gpt2_tokenizer(d)       # a tokenizer without pad
        >>> tok = load_policy_tokenizer(d, vocab_size=400)
        >>> tok.pad_token, tok.pad_token_id
        ('[PAD]', 384)
    """
    from transformers import AutoTokenizer

    path = resolve_source(source)
    if path.startswith("random:"):
        raise ValueError(
            f"A random policy ({source!r}) has no tokenizer; set TaskConfig.tokenizer to a tokenizer "
            "directory or hub name."
        )
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None and pad_with_eos and tok.eos_token_id is not None and (
        vocab_size is not None and len(tok) + 1 > vocab_size
    ):
        tok.pad_token = tok.eos_token
        logger.info("tokenizer %s has no pad token and no spare embedding row: pad = EOS (%r)", source, tok.eos_token)
    if tok.pad_token_id is None:
        tok.add_special_tokens({"pad_token": _PAD_TOKEN})
        logger.info("tokenizer %s has no pad token: added %r as id %d", source, _PAD_TOKEN, tok.pad_token_id)
    if tok.eos_token_id is None:
        raise ValueError(
            f"The tokenizer of {source!r} has no EOS token, which ends the sampled responses; use a "
            "tokenizer with an eos_token."
        )
    if vocab_size is not None and len(tok) > vocab_size:
        raise ValueError(
            f"The tokenizer of {source!r} has {len(tok)} tokens (pad id {tok.pad_token_id}) but the "
            f"policy's embedding has only {vocab_size} rows: every id must be < vocab_size. Use the "
            "tokenizer the policy was trained with (Pythia's 50304-row embedding covers '[PAD]' = 50277)."
        )
    return tok


def _dataset_source(task: TaskConfig) -> str:
    name = task.dataset or DEFAULT_DATASETS[task.kind]
    return resolve_source(name, kind="dataset")


def _hh_subset(task: TaskConfig, source: str) -> str | None:
    """HH's subset folder: ``task.dataset_subset``; when None, ``helpful-base``, except for a local
    directory without a ``helpful-base`` folder (a flat copy: its own split files, data_dir None)."""
    if task.dataset_subset is not None:
        return task.dataset_subset
    flat = os.path.isdir(source) and not os.path.isdir(os.path.join(source, "helpful-base"))
    return None if flat else "helpful-base"


def load_prompts(task: TaskConfig, tokenizer, *, seed: int = 0):
    """The task's training prompts as a :class:`klq_jax.data.PromptDataset` (see the module doc)."""
    name = task.dataset or DEFAULT_DATASETS[task.kind]
    source = _dataset_source(task)
    try:
        if task.kind == "tldr":
            return load_tldr(tokenizer, task.split, name_or_path=source, query_length=task.max_prompt_len,
                             data_dir=task.dataset_subset, source=task.tldr_source)
        if task.kind == "hh":
            return load_hh(tokenizer, task.split, name_or_path=source, data_dir=_hh_subset(task, source),
                           max_prompt_length=task.max_prompt_len, single_turn=task.hh_single_turn)
        if task.kind == "imdb":
            return load_imdb(tokenizer, task.split, name_or_path=source, data_dir=task.dataset_subset, seed=seed,
                             prompt_length_range=tuple(task.prompt_length_range))
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as err:
        if os.path.exists(source):  # a local copy that fails: the loader's own message says why
            raise
        message = f"{err}\n{_offline_hint(name, 'dataset (in the hub repo file layout)')}"
        try:
            new_err = type(err)(message)
        except Exception:  # an exception class with another constructor
            new_err = FileNotFoundError(message)
        raise new_err from err
    raise ValueError(f"experiments.tasks cannot load prompts for task kind {task.kind!r}")


def _read_config(path: str) -> dict:
    for name in ("config.json", "hf_config.json"):
        f = os.path.join(path, name)
        if os.path.isfile(f):
            with open(f) as fh:
                return json.load(fh)
    if os.path.isfile(os.path.join(path, "klq_config.json")):  # our format
        from klq_jax.models import hf

        cfg = hf.read_flax_config(path)
        return {"architectures": [hf.config_to_hf(cfg)["architectures"][0]]}
    raise FileNotFoundError(f"{path} has no config.json; pass a Hugging Face reward-model directory.")


def load_reward_model(task: TaskConfig, *, key: Any = None, mesh=None):
    """``(architecture, config, graphdef, params)`` of the task's reward model, in ``task.dtype``.

    GPT-NeoX score models (a Hugging Face or klq_jax directory) go through
    :func:`klq_jax.models.load.load_model` (which applies the options on every source kind); GPT-2
    and DistilBERT reward models through :func:`klq_jax.models.hf.load_hf`. With a ``mesh`` every
    tensor is placed in its sharding as it is read.
    """
    if task.reward_model is None:
        raise ValueError(f"Task kind {task.kind!r} needs TaskConfig.reward_model (a reward-model directory or hub name).")
    path = resolve_source(task.reward_model)
    if path.startswith("random:"):
        raise ValueError(f"reward_model={task.reward_model!r}: a random reward model is not supported; pass a checkpoint.")
    arch = (_read_config(path).get("architectures") or ["?"])[0]
    if arch in ("GPT2ForSequenceClassification", "DistilBertForSequenceClassification"):
        from klq_jax.models import hf

        if os.path.isfile(os.path.join(path, "klq_config.json")):
            cfg, graphdef, params = hf.load_flax(path, dtype=task.dtype)
            if mesh is not None:
                params = jax.device_put(params, sharding.param_shardings(params, mesh))
            return arch, cfg, graphdef, params
        return (arch, *hf.load_hf(path, dtype=task.dtype, mesh=mesh))
    if arch == "GPTNeoXForSequenceClassification":
        cfg, graphdef, params = load_model(path, key=key if key is not None else jax.random.key(0),
                                           dtype=task.dtype, mesh=mesh)
        if not cfg.score_head:
            raise ValueError(f"{task.reward_model}: the GPT-NeoX checkpoint has no score head.")
        return arch, cfg, graphdef, params
    raise ValueError(
        f"The reward model {task.reward_model} is a {arch}, which is not supported as a reward model. "
        "Supported: GPTNeoXForSequenceClassification and GPT2ForSequenceClassification with "
        "num_labels=1, DistilBertForSequenceClassification (the logit of TaskConfig.reward_label)."
    )


def load_reward_fn(
    task: TaskConfig,
    policy_tokenizer,
    *,
    stop_token_ids: tuple[int, ...],
    micro_batch_size: int = DEFAULT_SCORE_MICRO_BATCH_SIZE,
    key: Any = None,
    mesh=None,
):
    """``reward_fn`` of the task's reward model (see the module docstring for the dispatch)."""
    arch, cfg, graphdef, params = load_reward_model(task, key=key, mesh=mesh)
    if arch == "GPTNeoXForSequenceClassification" and task.reward_tokenizer is None:
        if len(policy_tokenizer) > cfg.vocab_size:
            raise ValueError(
                f"The reward model {task.reward_model} has {cfg.vocab_size} embedding rows but the policy "
                f"tokenizer has {len(policy_tokenizer)} tokens; if it uses another tokenizer, set "
                "TaskConfig.reward_tokenizer."
            )
        return rewards.make_rm_reward_fn(graphdef, params, micro_batch_size=micro_batch_size)
    from transformers import AutoTokenizer

    rm_tok_source = resolve_source(task.reward_tokenizer or task.reward_model)
    reward_tokenizer = AutoTokenizer.from_pretrained(rm_tok_source)
    classifier = arch == "DistilBertForSequenceClassification"
    if classifier and task.reward_label not in cfg.labels:
        raise ValueError(
            f"TaskConfig.reward_label={task.reward_label!r} is not a label of the reward model "
            f"{task.reward_model} (its config.label2id has {list(cfg.labels)}); set --task.reward-label."
        )
    return rewards.make_cross_tokenizer_reward_fn(
        graphdef, params, policy_tokenizer, reward_tokenizer,
        stop_token_ids=stop_token_ids,
        micro_batch_size=micro_batch_size,
        input_format="pair" if task.kind == "hh" else "concat",
        label=task.reward_label if classifier else None,
    )


def _prompt_iterator(dataset, batch_size: int, seed: int, task: TaskConfig) -> PromptIterator:
    """The prompts of THIS process: its slice of every global batch (all of it on one process).

    Raises:
      ConfigError: fewer prompts than one batch, with what to set on the command line.
    """
    if len(dataset) < batch_size:
        more = ("raise --task.num-prompts" if task.kind == "synthetic" else
                "point --task.dataset / --task.split at more prompts (those longer than "
                "--task.max-prompt-len are dropped)")
        raise ConfigError(
            f"The task has {len(dataset)} training prompt{'' if len(dataset) == 1 else 's'}, fewer than one "
            f"batch of {batch_size} rollouts: lower --rollouts-per-batch (--minibatch-size and "
            f"--micro-batch-size must divide it), or {more}."
        )
    return PromptIterator(dataset, batch_size=batch_size, seed=seed,
                          process_index=jax.process_index(), process_count=jax.process_count())


def build_experiment(
    task: TaskConfig,
    *,
    batch_size: int,
    seed: int,
    score_micro_batch_size: int | None = None,
    mesh=None,
    validation_prompts: int = 0,
) -> Experiment:
    """The :class:`klq_jax.train.Experiment` of any task kind (see the module docstring).

    Args:
      task: the task (models, dataset, split, prompt budget, dtype).
      batch_size: the GLOBAL number of prompts per iteration (``TrainConfig.rollouts_per_batch``).
      seed: seeds the value head's initialisation and the prompt order.
      score_micro_batch_size: rows per reward-model forward (default
        :data:`DEFAULT_SCORE_MICRO_BATCH_SIZE`, capped at ``batch_size``).
      mesh: load every model straight into its shardings on this mesh.
      validation_prompts: load this many held-out prompts as ``Experiment.validation_prompts``
        (0: none): the task's held-out split, or a synthetic set disjoint from the training prompts.

    Returns:
      The experiment; ``prompts`` yields THIS process's rows of every global batch
      (``batch_size / jax.process_count()`` rows: process ``p`` reads the ``p``-th slice), which the
      trainer joins into one batch-sharded array. Every process builds the same models.

    Raises:
      SourceNotFoundError (a FileNotFoundError): models or datasets that are neither local nor
        downloadable, all named at once (:func:`check_sources`, before anything is loaded; the
        message names ``KLQ_LOCAL_MODELS``); ValueError: unsupported reward model,
        tokenizer/embedding mismatch.
    """
    check_sources(task)
    synthetic = task.kind == "synthetic"
    if synthetic:
        key_value = key_rm = jax.random.key(seed)
    else:
        key_value, key_rm = jax.random.split(jax.random.key(seed))
    cfg, graphdef, params = load_model(
        task.policy, key=key_value, value_head=True, dtype=task.dtype, mesh=mesh
    )
    ref_graphdef = ref_params = None
    if task.reference is not None:
        _, ref_graphdef, ref_params = load_model(
            task.reference, key=key_value, dtype=task.dtype, mesh=mesh
        )
    if task.critic is not None:  # TRL's layout: a separate value network from the reward model
        source = task.reward_model if task.critic == "reward_model" else task.critic
        if source is None:
            raise ValueError("TaskConfig.critic='reward_model' needs TaskConfig.reward_model to be set.")
        graphdef, params, crit_ref_gd, crit_ref_p = attach_critic(
            graphdef, params, source, key=key_value, dtype=task.dtype, mesh=mesh
        )
        if ref_params is None:
            ref_graphdef, ref_params = crit_ref_gd, crit_ref_p
    common = dict(graphdef=graphdef, params=params, ref_graphdef=ref_graphdef, ref_params=ref_params)
    if synthetic:
        if task.reward_model is not None and task.critic != "reward_model":
            logger.warning(
                "The synthetic task scores with its programmatic reward %r and ignores --task.reward-model "
                "%s: drop it, or pick a reward-model task (or --task.critic reward_model to initialise the "
                "critic from it).", task.reward, task.reward_model)
        problems = task.vocabulary_problems(cfg.vocab_size)
        if problems:  # before the run directory is created (build_experiment comes first)
            raise ConfigError(f"Invalid TaskConfig for the policy {task.policy}: " + "; ".join(problems))
        dataset = synthetic_prompts(task.num_prompts, task.prompt_len, cfg.vocab_size, seed, task.pad_token_id)
        heldout = None
        if validation_prompts:
            heldout = heldout_synthetic_prompts(dataset, validation_prompts, task.prompt_len,
                                                cfg.vocab_size, seed, task.pad_token_id)
        return Experiment(
            validation_prompts=heldout,
            reward_fn=rewards.programmatic_reward(task.reward, target_token=task.target_token),
            prompts=_prompt_iterator(dataset, batch_size, seed, task),
            stop_token_ids=(task.stop_token_id,),
            pad_token_id=task.pad_token_id,
            **common,
        )
    tokenizer = load_policy_tokenizer(task.tokenizer or task.policy, vocab_size=cfg.vocab_size,
                                      pad_with_eos=task.kind == "imdb")
    dataset = load_prompts(task, tokenizer, seed=seed)
    logger.info("%s: %d prompts of width %d (dropped %s)", dataset.name, len(dataset), dataset.width,
                dict(dataset.drop_reasons))
    stop_token_ids = (int(tokenizer.eos_token_id),)
    micro = min(score_micro_batch_size or DEFAULT_SCORE_MICRO_BATCH_SIZE, batch_size)
    reward_fn = load_reward_fn(task, tokenizer, stop_token_ids=stop_token_ids, micro_batch_size=micro,
                               key=key_rm, mesh=mesh)
    heldout = None
    if validation_prompts:
        heldout = load_validation_prompts(task, tokenizer, validation_prompts)
    return Experiment(
        validation_prompts=heldout,
        reward_fn=reward_fn,
        prompts=_prompt_iterator(dataset, batch_size, seed, task),
        stop_token_ids=stop_token_ids,
        pad_token_id=int(tokenizer.pad_token_id),
        decode=lambda ids: tokenizer.decode(list(ids)),
        tokenizer=tokenizer,
        **common,
    )
