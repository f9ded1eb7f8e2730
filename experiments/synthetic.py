"""A synthetic language small enough to enumerate: prompts, a generative grammar, an SFT policy, a reward.

This is the world of the offline demo (``python -m experiments.demo``) and of the exact-optimum tests.
Everything is deterministic from a seed and runs in seconds on a CPU.

* **Vocabulary** (8 words): ``<eos> cat dog and runs sleeps eats fast``. ``<eos>`` is id 0 and is
  also the padding id (padded slots are always masked out, so sharing the id keeps every entry of
  the vocabulary a real word and the response enumeration small).
* **Prompts**: ``"cat"``, ``"dog"``, ``"cat and dog"``, ``"dog and cat"`` (uniform).
* **Responses** come from a stochastic grammar (a probabilistic finite-state machine): a verb
  whose distribution depends on the prompt's animal(s) (cats mostly sleep, dogs mostly run, pairs
  mostly eat), then optionally ``fast`` (likely after ``runs``, rare after ``eats``, never after
  ``sleeps``), then optionally ``and`` + a second verb, then ``<eos>``. The longest grammatical
  response, e.g. ``runs fast and eats <eos>``, has 5 tokens = ``T_max``.
* **The base ("SFT") policy π_b** is a tiny GPT-NeoX fitted to a corpus drawn from the grammar by
  maximum likelihood (:func:`train_sft`, our own optax loop). π_b is the *network*, not the
  grammar: the exact optimum below is computed for the network.
* **The reward** (:func:`reward_fn`, an "energetic grader"): ``+1`` if the response contains the
  bigram ``runs fast`` and ``-0.5`` if it rambles on with ``and``. π_b says ``runs fast`` rarely
  (≈4.5 % of the time to ``cat``, ≈15 % to ``dog``), so the KL-regularised optimum
  ``π*(y|x) ∝ π_b(y|x)·exp(R(x, y)/τ)`` (paper §2, App. A) is far from π_b. The rollout adds the
  ω penalty for a response that hits ``T_max`` without ``<eos>`` (Algorithms 1-2).

:class:`SyntheticTask` bundles the language with τ, ω and T_max, builds the trainer's
:class:`~klq_jax.train.Experiment`, and evaluates a network exactly (J(π), J*, KL(π‖π_b),
KL(π‖π*)) by enumerating all ``num_responses(8, 5) = 19608`` responses per prompt.

Example:
    >>> lang = SyntheticLanguage()
    >>> lang.vocab_size, lang.decode(lang.encode("cat runs fast"))
    (8, 'cat runs fast')
    >>> dist = lang.response_distribution("dog")
    >>> round(sum(dist.values()), 12), round(dist[tuple(lang.encode("runs fast <eos>"))], 3)
    (1.0, 0.12)
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from klq_jax import evaluate
from klq_jax.data import PromptDataset, PromptIterator
from klq_jax.models import gpt_neox
from klq_jax.rollout import response_logprobs
from klq_jax.train import Experiment

__all__ = [
    "EOS_ID",
    "PAD_ID",
    "WORDS",
    "SyntheticLanguage",
    "reward_fn",
    "sft_model_config",
    "SFTResult",
    "train_sft",
    "grammar_kl",
    "add_value_head",
    "save_tokenizer",
    "SyntheticTask",
]

EOS_ID = 0
PAD_ID = 0
WORDS = ("<eos>", "cat", "dog", "and", "runs", "sleeps", "eats", "fast")
PROMPTS = ("cat", "dog", "cat and dog", "dog and cat")
VERBS = ("runs", "sleeps", "eats")


@dataclasses.dataclass(frozen=True)
class SyntheticLanguage:
    """The vocabulary, the prompts and the response grammar (see the module docstring).

    Attributes:
      words: ``id -> word``; ``words[0]`` is ``<eos>`` (also the padding id).
      prompts: the distinct prompts (uniformly distributed).
      verb_probs: ``(subject, ((verb, p), ...))`` for subjects ``"cat"``, ``"dog"``, ``"pair"``.
      fast_probs: ``((verb, P(fast | verb)), ...)``.
      and_prob: probability of going on with ``and`` + a second verb (after a verb that was not
        followed by ``fast``, it is ``(1 - P(fast|verb))·and_prob``).
      t_max: the response budget T_max (the longest grammatical response fits exactly).

    Example:
      >>> lang = SyntheticLanguage()
      >>> lang.encode("cat and dog"), lang.t_max
      ([1, 3, 2], 5)
    """

    words: tuple[str, ...] = WORDS
    prompts: tuple[str, ...] = PROMPTS
    verb_probs: tuple = (
        ("cat", (("runs", 0.15), ("sleeps", 0.55), ("eats", 0.30))),
        ("dog", (("runs", 0.50), ("sleeps", 0.20), ("eats", 0.30))),
        ("pair", (("runs", 0.25), ("sleeps", 0.25), ("eats", 0.50))),
    )
    fast_probs: tuple = (("runs", 0.30), ("sleeps", 0.0), ("eats", 0.15))
    and_prob: float = 0.2
    t_max: int = 5

    def __post_init__(self):
        if self.words[EOS_ID] != "<eos>":
            raise ValueError(f"SyntheticLanguage: words[{EOS_ID}] must be '<eos>', got {self.words[EOS_ID]!r}.")
        if len(set(self.words)) != len(self.words):
            raise ValueError("SyntheticLanguage: words must be distinct.")
        for _, probs in self.verb_probs:
            if abs(sum(p for _, p in probs) - 1.0) > 1e-9:
                raise ValueError(f"SyntheticLanguage: verb probabilities {probs} must sum to 1.")
        if self.t_max < 5:
            raise ValueError(f"SyntheticLanguage: t_max={self.t_max} is too short for the grammar (needs >= 5).")

    # -- tokens --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def prompt_width(self) -> int:
        return max(len(p.split()) for p in self.prompts)

    def encode(self, text: str) -> list[int]:
        """Whitespace-separated words → ids (``<eos>`` is a word like any other)."""
        index = {w: i for i, w in enumerate(self.words)}
        try:
            return [index[w] for w in text.split()]
        except KeyError as e:
            raise ValueError(f"{e.args[0]!r} is not a word of the synthetic language {self.words}.") from None

    def decode(self, ids) -> str:
        """ids → words joined by spaces."""
        return " ".join(self.words[int(i)] for i in ids)

    def prompt_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct prompts, left-padded: ``(prompt_ids [P, Tq] int32, prompt_mask [P, Tq] float32)``."""
        P, Tq = len(self.prompts), self.prompt_width
        ids = np.full((P, Tq), PAD_ID, np.int32)
        mask = np.zeros((P, Tq), np.float32)
        for i, p in enumerate(self.prompts):
            toks = self.encode(p)
            ids[i, Tq - len(toks):] = toks
            mask[i, Tq - len(toks):] = 1.0
        return ids, mask

    def prompt_dataset(self, copies: int = 16) -> PromptDataset:
        """Each distinct prompt ``copies`` times (a uniform prompt distribution for the trainer)."""
        ids, mask = self.prompt_arrays()
        return PromptDataset(
            prompt_ids=np.tile(ids, (copies, 1)),
            prompt_mask=np.tile(mask, (copies, 1)),
            prompt_texts=list(self.prompts) * copies,
            references=None,
            pad_id=PAD_ID,
            name="synthetic-language",
        )

    # -- the grammar ---------------------------------------------------------------------------

    def _subject(self, prompt: str) -> str:
        animals = [w for w in prompt.split() if w in ("cat", "dog")]
        return animals[0] if len(animals) == 1 else "pair"

    def response_distribution(self, prompt: str) -> dict[tuple[int, ...], float]:
        """The grammar's exact ``p(y | prompt)`` over its (few dozen) responses, ``<eos>`` included."""
        verbs = dict(dict(self.verb_probs)[self._subject(prompt)])
        fast = dict(self.fast_probs)
        w = {word: i for i, word in enumerate(self.words)}
        out: dict[tuple[int, ...], float] = {}

        def add(seq, p):
            if p > 0:
                key = tuple(w[s] for s in seq) + (EOS_ID,)
                out[key] = out.get(key, 0.0) + p

        def second(prefix, p):  # "and" + a verb, then <eos>
            for v2, q in verbs.items():
                add(prefix + ["and", v2], p * q)

        for v, pv in verbs.items():
            pf = fast[v]
            add([v, "fast"], pv * pf * (1 - self.and_prob))
            second([v, "fast"], pv * pf * self.and_prob)
            add([v], pv * (1 - pf) * (1 - self.and_prob))
            second([v], pv * (1 - pf) * self.and_prob)
        return out

    def sample_corpus(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """``n`` (prompt, response) pairs drawn from the prompts × grammar, as padded arrays.

        Returns ``{"prompt_ids", "prompt_mask"}`` ``[n, Tq]`` (left-padded) and ``{"response_ids",
        "response_mask"}`` ``[n, t_max]`` (right-padded, ``<eos>`` included in the mask).
        """
        rng = np.random.default_rng(seed)
        p_ids, p_mask = self.prompt_arrays()
        which = rng.integers(0, len(self.prompts), size=n)
        r_ids = np.full((n, self.t_max), PAD_ID, np.int32)
        r_mask = np.zeros((n, self.t_max), np.float32)
        for i, prompt in enumerate(self.prompts):
            rows = np.nonzero(which == i)[0]
            dist = self.response_distribution(prompt)
            seqs = list(dist)
            probs = np.array([dist[s] for s in seqs])
            picks = rng.choice(len(seqs), size=len(rows), p=probs / probs.sum())
            for r, k in zip(rows, picks):
                s = seqs[k]
                r_ids[r, : len(s)] = s
                r_mask[r, : len(s)] = 1.0
        return {"prompt_ids": p_ids[which], "prompt_mask": p_mask[which], "response_ids": r_ids,
                "response_mask": r_mask}


# ------------------------------------------------------------------------------------------
# The reward
# ------------------------------------------------------------------------------------------


def reward_fn(language: SyntheticLanguage | None = None, *, bonus: float = 1.0, and_penalty: float = 0.5) -> Callable:
    """The "energetic grader" R(x, y): ``bonus·1[y has 'runs fast'] - and_penalty·1[y has 'and']``.

    A jitted ``(prompt_ids [B, Tq], prompt_mask [B, Tq], response_ids [B, T], response_mask [B, T])
    -> [B] float32`` (the trainer's ``reward_fn``); only real response tokens count. The ω penalty
    for a missing ``<eos>`` is NOT included (the rollout adds it, Algorithms 1-2).

    Example:
      >>> lang = SyntheticLanguage()
      >>> ids = np.array([lang.encode("runs fast <eos> <eos> <eos>"), lang.encode("eats and runs fast <eos>")])
      >>> r = reward_fn(lang)(None, None, ids, np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1.0]]))
      >>> np.asarray(r).tolist()
      [1.0, 0.5]
    """
    language = language or SyntheticLanguage()
    runs, fast, and_ = (language.words.index(w) for w in ("runs", "fast", "and"))

    @jax.jit
    def fn(prompt_ids, prompt_mask, response_ids, response_mask):
        real = jnp.asarray(response_mask) != 0
        ids = jnp.asarray(response_ids)
        bigram = (ids[:, :-1] == runs) & (ids[:, 1:] == fast) & real[:, 1:]
        has_and = jnp.any((ids == and_) & real, axis=1)
        return (bonus * jnp.any(bigram, axis=1) - and_penalty * has_and).astype(jnp.float32)

    return fn


# ------------------------------------------------------------------------------------------
# The SFT policy π_b
# ------------------------------------------------------------------------------------------


def sft_model_config(language: SyntheticLanguage | None = None, **overrides) -> gpt_neox.GPTNeoXConfig:
    """The tiny GPT-NeoX of π_b: D=32, 2 layers, 4 heads, vocabulary = the language's.

    Example:
      >>> sft_model_config().vocab_size
      8
    """
    language = language or SyntheticLanguage()
    base = gpt_neox.GPTNeoXConfig.tiny(
        vocab_size=language.vocab_size, max_position_embeddings=32, hidden_size=32,
        intermediate_size=64, num_layers=2, num_heads=4,
    )
    return base.replace(**overrides)


class SFTResult(NamedTuple):
    """What :func:`train_sft` returns: the model (no value head) and the loss per step."""

    config: gpt_neox.GPTNeoXConfig
    graphdef: Any
    params: Any
    losses: np.ndarray


def _nll(graphdef, params, batch):
    logp, _ = response_logprobs(graphdef, params, batch["prompt_ids"], batch["prompt_mask"],
                                batch["response_ids"], batch["response_mask"])
    m = batch["response_mask"]
    return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)


def train_sft(
    language: SyntheticLanguage | None = None,
    *,
    config: gpt_neox.GPTNeoXConfig | None = None,
    corpus_size: int = 8192,
    steps: int = 400,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = False,
) -> SFTResult:
    """π_b: maximum likelihood of the grammar's responses given the prompts (our own optax loop).

    Minimises the mean per-token negative log-likelihood ``-Σ_t log π(y_t | x, y_<t) / Σ T`` of a
    corpus of ``corpus_size`` (prompt, response) pairs (``<eos>`` included; prompts are not
    modelled) with AdamW and a cosine-decayed learning rate, on shuffled minibatches. One jitted
    step; deterministic from ``seed`` (the corpus, the initialisation and the shuffles).

    Args:
      language: the synthetic language (default :class:`SyntheticLanguage()`).
      config: the model (default :func:`sft_model_config`); ``value_head`` is ignored (off).
      corpus_size, steps, batch_size, learning_rate, seed: the fit.
      progress: show a tqdm bar.

    Returns:
      :class:`SFTResult` with ``losses [steps]``.

    Example:
      >>> sft = train_sft(steps=5, corpus_size=256, batch_size=32)
      >>> sft.config.vocab_size, sft.losses.shape
      (8, (5,))
    """
    language = language or SyntheticLanguage()
    config = (config or sft_model_config(language)).replace(value_head=False, score_head=False)
    if config.vocab_size != language.vocab_size:
        raise ValueError(f"train_sft: config.vocab_size={config.vocab_size} must equal the language's {language.vocab_size}.")
    corpus = {k: jnp.asarray(v) for k, v in language.sample_corpus(corpus_size, seed).items()}
    graphdef, params = gpt_neox.init(config, jax.random.key(seed))
    opt = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.05), weight_decay=0.0)
    opt_state = opt.init(params)

    def step(carry, idx):
        params, opt_state = carry
        batch = {k: v[idx] for k, v in corpus.items()}
        loss, grads = jax.value_and_grad(lambda p: _nll(graphdef, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    # Several steps per call (a lax.scan): the host does not wait on every tiny step.
    run = jax.jit(lambda params, opt_state, idx: jax.lax.scan(step, (params, opt_state), idx))
    rng = np.random.default_rng([seed, 1])
    per_epoch = corpus_size // batch_size
    if per_epoch < 1:
        raise ValueError(f"train_sft: corpus_size={corpus_size} is smaller than batch_size={batch_size}.")
    idx = np.concatenate([
        rng.permutation(corpus_size)[: per_epoch * batch_size].reshape(per_epoch, batch_size)
        for _ in range(-(-steps // per_epoch))
    ])[:steps].astype(np.int32)
    chunk = min(steps, 50)
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="SFT", unit="step")
    for i in range(0, steps, chunk):
        (params, opt_state), loss = run(params, opt_state, idx[i: i + chunk])
        losses.append(np.asarray(loss))
        if bar is not None:
            bar.set_postfix(nll=f"{float(losses[-1][-1]):.3f}")
            bar.update(len(losses[-1]))
    if bar is not None:
        bar.close()
    losses = np.concatenate(losses).astype(np.float32)
    return SFTResult(config, graphdef, params, losses)


def grammar_kl(language: SyntheticLanguage, graphdef, params) -> np.ndarray:
    """Exact ``KL(p_grammar(.|x) ‖ π(.|x))`` of a network, per prompt: ``[P]`` float64 nats.

    How well the SFT fit reproduces the grammar (0 for a perfect fit). Sums over the grammar's
    responses only (its support), with π(y|x) from one forward pass per prompt.

    Example::

        >>> sft = train_sft()                                           # doctest: +SKIP
        >>> grammar_kl(SyntheticLanguage(), sft.graphdef, sft.params)   # doctest: +SKIP
        array([0.004, 0.003, 0.006, 0.005])
    """
    p_ids, p_mask = language.prompt_arrays()
    out = []
    for i, prompt in enumerate(language.prompts):
        dist = language.response_distribution(prompt)
        seqs = list(dist)
        r_ids = np.full((len(seqs), language.t_max), PAD_ID, np.int32)
        r_mask = np.zeros((len(seqs), language.t_max), np.float32)
        for k, s in enumerate(seqs):
            r_ids[k, : len(s)], r_mask[k, : len(s)] = s, 1.0
        logp, _ = response_logprobs(graphdef, params, np.repeat(p_ids[i:i + 1], len(seqs), 0),
                                    np.repeat(p_mask[i:i + 1], len(seqs), 0), r_ids, r_mask)
        logq = np.asarray(logp, np.float64).sum(1)
        p = np.array([dist[s] for s in seqs])
        out.append(float(np.sum(p * (np.log(p) - logq))))
    return np.array(out)


def add_value_head(config: gpt_neox.GPTNeoXConfig, params, key) -> tuple[gpt_neox.GPTNeoXConfig, Any, Any]:
    """``(config, graphdef, params)`` of the same network plus a freshly initialised value head.

    Example:
      >>> cfg = sft_model_config()
      >>> _, p = gpt_neox.init(cfg, jax.random.key(0))
      >>> cfg2, gd2, p2 = add_value_head(cfg, p, jax.random.key(1))
      >>> cfg2.value_head, gpt_neox.param_count(p2) - gpt_neox.param_count(p)
      (True, 33)
    """
    cfg2 = config.replace(value_head=True)
    graphdef, fresh = gpt_neox.init(cfg2, key)
    pure = nnx.to_pure_dict(fresh)
    pure.update(nnx.to_pure_dict(params))
    nnx.replace_by_pure_dict(fresh, pure)
    return cfg2, graphdef, fresh


def save_tokenizer(language: SyntheticLanguage, path: str | os.PathLike) -> str:
    """Write a Hugging Face word-level tokenizer of the language to ``path`` (``AutoTokenizer`` loads it).

    ``<eos>`` is id 0 and serves as eos, bos, unk and pad token.

    Example::

        >>> save_tokenizer(SyntheticLanguage(), "/tmp/tok")                         # doctest: +SKIP
        >>> AutoTokenizer.from_pretrained("/tmp/tok")("cat runs fast")["input_ids"]   # doctest: +SKIP
        [1, 4, 7]
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(language.words)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<eos>", eos_token="<eos>",
                                 unk_token="<eos>", pad_token="<eos>")
    hf.save_pretrained(os.fspath(path))
    return os.fspath(path)


# ------------------------------------------------------------------------------------------
# The task: experiment for the trainer + exact evaluation
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SyntheticTask:
    """The RLHF problem on the synthetic language: reward, τ, ω, T_max, and its exact solution.

    Attributes:
      language: the :class:`SyntheticLanguage`.
      tau: KL coefficient τ of J(π) = E[R] − τ·KL(π‖π_b) (must equal the trainer's ``algo.tau``).
      omega: the missing-``<eos>`` penalty ω (must equal the trainer's ``omega``).
      temperature: the trainer's sampling temperature (``TrainConfig.temperature``); the exact
        evaluation scores π and π_b at it by default, as the objective the run optimises is
        J(π_T) = E_{π_T}[R] − τ·KL(π_T‖π_{b,T}) between the temperature-scaled policies.

    Example:
      >>> task = SyntheticTask(tau=0.2)
      >>> task.rewards_table().shape     # [P prompts, M responses], ω included
      (4, 19608)
    """

    language: SyntheticLanguage = dataclasses.field(default_factory=SyntheticLanguage)
    tau: float = 0.2
    omega: float = 1.0
    temperature: float = 1.0

    @property
    def t_max(self) -> int:
        return self.language.t_max

    @functools.cached_property
    def reward(self) -> Callable:
        return reward_fn(self.language)

    def rewards_table(self) -> np.ndarray:
        """``[P, M]`` float64: R(x, y) − ω·1[y truncated] of every prompt and enumerated response."""
        lang = self.language
        responses, rmask, truncated = evaluate.enumerate_responses(lang.vocab_size, EOS_ID, self.t_max, PAD_ID)
        p_ids, p_mask = lang.prompt_arrays()
        rows = []
        for i in range(len(lang.prompts)):
            m = responses.shape[0]
            r = np.asarray(self.reward(np.repeat(p_ids[i:i + 1], m, 0), np.repeat(p_mask[i:i + 1], m, 0),
                                       responses, rmask), np.float64)
            rows.append(r - self.omega * truncated)
        return np.stack(rows)

    def experiment(self, graphdef, params, *, batch_size: int, seed: int = 0, ref_graphdef=None,
                   ref_params=None, decode: Callable | None = None):
        """The trainer's :class:`~klq_jax.train.Experiment` (policy with a value head; π_b = θ_0 by default)."""
        P = len(self.language.prompts)
        copies = max(1, -(-batch_size // P))
        return Experiment(
            graphdef=graphdef,
            params=params,
            reward_fn=self.reward,
            prompts=PromptIterator(self.language.prompt_dataset(copies), batch_size=batch_size, seed=seed),
            ref_graphdef=ref_graphdef,
            ref_params=ref_params,
            stop_token_ids=(EOS_ID,),
            pad_token_id=PAD_ID,
            decode=decode or self.language.decode,
        )

    @functools.cached_property
    def _table(self) -> np.ndarray:
        return self.rewards_table()

    def exact(self, graphdef, params, ref_graphdef, ref_params, *, ref_logp: np.ndarray | None = None,
              pol_logp: np.ndarray | None = None, temperature: float | None = None) -> dict:
        """Exact J(π), E_π[R], KL(π‖π_b), KL(π‖π*), J* averaged over the (uniform) prompts.

        π is the network ``(graphdef, params)`` and π_b is ``(ref_graphdef, ref_params)`` (or pass
        their enumerated ``pol_logp`` / ``ref_logp [P, M]`` from :meth:`sequence_logprobs`, at the
        same temperature, to skip recomputing them), both at ``temperature`` (default: the task's
        training temperature). See :func:`klq_jax.evaluate.exact_evaluation`.
        """
        pol = (self.sequence_logprobs(graphdef, params, temperature=temperature)
               if pol_logp is None else pol_logp)
        ref = (self.sequence_logprobs(ref_graphdef, ref_params, temperature=temperature)
               if ref_logp is None else ref_logp)
        rows = [evaluate.exact_objective(pol[i], ref[i], self._table[i], self.tau) for i in range(pol.shape[0])]
        per_prompt = {k: np.array([row[k] for row in rows]) for k in rows[0]}
        out = {k: float(v.mean()) for k, v in per_prompt.items()}
        out["per_prompt"] = per_prompt
        return out

    def sequence_logprobs(self, graphdef, params, *, temperature: float | None = None) -> np.ndarray:
        """``[P, M]`` float64 ``log π(y|x)`` of the network at ``temperature`` (default: the task's
        training temperature) for every prompt and response."""
        p_ids, p_mask = self.language.prompt_arrays()
        t = self.temperature if temperature is None else temperature
        fn = evaluate.model_next_logprobs(graphdef, params, temperature=t)
        return evaluate.sequence_logprobs_batch(fn, p_ids, p_mask, self.t_max, self.language.vocab_size,
                                                EOS_ID, pad_id=PAD_ID)

    def optimal_logprobs(self, ref_logp: np.ndarray) -> np.ndarray:
        """``[P, M]`` ``log π*(y|x) = log π_b + R/τ − J*/τ`` from π_b's enumerated log-probs."""
        return np.stack([evaluate.exact_optimum(ref_logp[i], self._table[i], self.tau)[1]
                         for i in range(ref_logp.shape[0])])
