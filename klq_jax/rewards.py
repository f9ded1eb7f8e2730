"""Reward-model scoring ``R_φ(x, y)`` for the rollout: same tokenizer as the policy, or another one.

Every scorer here is a ``reward_fn(prompt_ids, prompt_mask, response_ids, response_mask) -> [B]``
float32, the signature :func:`klq_jax.rollout.make_rollout` calls with the sampler's output:
``prompt_ids/prompt_mask [B, Tq]`` LEFT-padded, ``response_ids/response_mask [B, Tr]`` RIGHT-padded
with the mask 1 on every real response token, **the stop token included** (the sampler keeps it
as the last real token; a row without one was truncated at ``T_max``). The missing-stop penalty ω is
*not* applied here: :func:`klq_jax.rollout.sequence_rewards` subtracts it afterwards.

1. **Same tokenizer** (TL;DR: ``cleanrl/EleutherAI_pythia-1b-deduped__reward__tldr`` shares the
   policy's Pythia tokenizer): :func:`make_rm_reward_fn`. The ids go straight into the GPT-NeoX
   score model as ``x ⧺ y``, and the score is read at the last real response token: the EOS when
   the row stopped, the ``T_max``-th token otherwise. This is TRL's ``get_reward`` on the truncated
   response (rlhf_facts.md §1), which the N+ reward model was trained for (its inputs end with
   ``<|endoftext|>``, rlhf_facts.md §2).

2. **Another tokenizer** (HH: ``Ray2333/gpt2-large-helpful-reward_model`` is a GPT-2 with GPT-2's
   tokenizer, rlhf_facts.md §4): :func:`make_cross_tokenizer_reward_fn`. On the host, per row:

   * ``q`` = the prompt's real tokens decoded with the policy tokenizer
     (``skip_special_tokens=True``, no clean-up of spaces, so byte-level BPE gives back the exact
     text, e.g. ``"\\n\\nHuman: …\\n\\nAssistant:"``);
   * ``a`` = the response's real tokens **without the stop token** (a stop token is dropped even
     when it is not a special token), decoded the same way; a truncated row keeps all ``T_max``
     tokens;
   * the RM's ids = ``reward_tokenizer(q, a)`` (``input_format="pair"``, the Ray2333 model card's
     usage) or ``reward_tokenizer(q + a)`` (``"concat"``; prompt and response ids decoded together,
     so a character split at their boundary stays whole), or a callable's output;
   * rows longer than ``max_length`` (the RM's context) keep their LAST ``max_length`` tokens
     (the end of the prompt and the whole response survive), counted and logged;
   * rows are sorted by length, cut into micro-batches of ``micro_batch_size`` rows (the last one
     filled up with dummy rows), each padded to a width that is a power of two (at least
     ``min_bucket``, at most ``max_length``), so the jitted scorer compiles once per bucket width;
   * the score is read at each row's last real token by the mask, never by a pad id (GPT-2's
     tokenizer has none).

Example (a tiny random GPT-NeoX reward model sharing the tokenizer)::

    >>> import jax, jax.numpy as jnp
    >>> from klq_jax.models import gpt_neox
    >>> from klq_jax.rewards import make_rm_reward_fn
    >>> gd, p = gpt_neox.init(gpt_neox.GPTNeoXConfig.tiny(lm_head=False, score_head=True), jax.random.key(0))
    >>> reward_fn = make_rm_reward_fn(gd, p, micro_batch_size=2)
    >>> reward_fn(jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]), jnp.array([[7, 0]]), jnp.array([[1.0, 1.0]])).shape
    (1,)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable, Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from klq_jax import rollout
from klq_jax.sampling import _concrete
from klq_jax.types import DeviceReward

Array = jax.Array

logger = logging.getLogger(__name__)

__all__ = [
    "reward_model_scores",
    "programmatic_reward",
    "make_rm_reward_fn",
    "make_score_ids_fn",
    "decode_rollout_texts",
    "RMInputs",
    "build_rm_inputs",
    "bucket_width",
    "pad_rows",
    "CrossTokenizerRewardFn",
    "make_cross_tokenizer_reward_fn",
]


# ------------------------------------------------------------------------------------------
# Same tokenizer
# ------------------------------------------------------------------------------------------


def _reward_model_scores_traced(graphdef, params, prompt_ids, prompt_mask, response_ids,
                                response_mask, micro_batch_size=None, groups=1):
    def forward(p_ids, p_mask, r_ids, r_mask):
        model = nnx.merge(graphdef, params)
        tokens = jnp.concatenate([p_ids, r_ids], axis=1).astype(jnp.int32)
        mask = jnp.concatenate([p_mask.astype(bool), r_mask != 0], axis=1)
        # The last real token is at or after the last prompt slot (left-padded prompts): the last
        # layer runs only from there on (a row that ends before it scores NaN).
        out = model(tokens, mask, logits=False, queries_from=max(p_ids.shape[1] - 1, 0))
        return out.scores.astype(jnp.float32)

    return rollout.map_micro_batches(
        forward, (prompt_ids, prompt_mask, response_ids, response_mask), micro_batch_size,
        groups=groups,
    )


_reward_model_scores = jax.jit(
    _reward_model_scores_traced, static_argnames=("graphdef", "micro_batch_size", "groups")
)


@functools.lru_cache(maxsize=None)
def _rm_device_fn(graphdef, micro_batch_size):
    """The :class:`DeviceReward` function of a score-head model (one per graphdef / chunk size,
    so every reward built from the same model shares one compiled rollout)."""

    def fn(params, prompt_ids, prompt_mask, response_ids, response_mask, groups):
        return _reward_model_scores_traced(graphdef, params, prompt_ids, prompt_mask, response_ids,
                                           response_mask, micro_batch_size, groups)

    return fn


def reward_model_scores(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    prompt_ids: Array,
    prompt_mask: Array,
    response_ids: Array,
    response_mask: Array,
    *,
    micro_batch_size: int | None = None,
) -> Array:
    """``R_φ(x, y)``: a GPT-NeoX score-head reward model read at the last real token of ``x ⧺ y``.

    The reward model must share the policy's tokenizer (for another tokenizer, decode and
    re-encode on the host and pass your own ``reward_fn`` to :func:`make_rollout`). As TRL's
    ``get_reward``, the score is the score head applied to the final hidden state of the last
    real response token (the stop token when there is one).

    Args:
      graphdef, params: a GPT-NeoX built with ``score_head=True`` (``load_hf`` of a
        ``GPTNeoXForSequenceClassification``).
      prompt_ids, prompt_mask: ``[B, Tq]`` left-padded prompts.
      response_ids, response_mask: ``[B, Tr]`` right-padded responses.
      micro_batch_size: forward in ``lax.map`` chunks of this many rows (``None``: all at once).

    Returns:
      ``[B]`` float32 scores.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from klq_jax.models import gpt_neox
      >>> from klq_jax.rewards import reward_model_scores
      >>> cfg = gpt_neox.GPTNeoXConfig.tiny(lm_head=False, score_head=True)
      >>> gd, p = gpt_neox.init(cfg, jax.random.key(0))
      >>> reward_model_scores(gd, p, jnp.array([[0, 5, 6]]), jnp.array([[0, 1, 1]]),
      ...                     jnp.array([[7, 0]]), jnp.array([[1.0, 0.0]])).shape
      (1,)
    """
    rollout.check_prompt_response(prompt_ids, prompt_mask, response_ids, response_mask, "reward_model_scores")
    rollout.check_micro_batch_size(micro_batch_size)
    _check_ends_after_prompt(prompt_mask, response_mask)
    if not nnx.merge(graphdef, params).config.score_head:
        raise ValueError(
            "reward_model_scores needs a reward model with a score head (GPTNeoXConfig(score_head=True), "
            "e.g. load_hf of a GPTNeoXForSequenceClassification checkpoint)."
        )
    return _reward_model_scores(
        graphdef, params, prompt_ids, prompt_mask, response_ids, response_mask, micro_batch_size
    )


def _check_ends_after_prompt(prompt_mask, response_mask) -> None:
    """Refuse rows whose ``x ⧺ y`` ends before the last prompt slot (scored from that slot on)."""
    if not (_concrete(prompt_mask) and _concrete(response_mask)) or np.shape(prompt_mask)[1] == 0:
        return
    pm, rm = np.asarray(prompt_mask) != 0, np.asarray(response_mask) != 0
    bad = pm.any(axis=1) & ~pm[:, -1] & ~rm.any(axis=1)
    if bad.any():
        rows = np.nonzero(bad)[0].tolist()
        raise ValueError(
            f"reward_model_scores: rows {rows[:10]} have an empty response and padding in the last "
            "prompt slot; the score is read from that slot on, so left-pad the prompts (pad at the start)."
        )


def make_rm_reward_fn(graphdef: nnx.GraphDef, params: nnx.State, *, micro_batch_size: int | None = None) -> DeviceReward:
    """A ``reward_fn`` scoring ``x ⧺ y`` token ids with a GPT-NeoX score-head reward model.

    ``R_φ(x, y)`` = the score head on the final hidden state of the last real token of ``x ⧺ y``
    (the stop token of a stopped response), positions from the masks
    (:func:`reward_model_scores`, jitted, ``lax.map`` over micro-batches).

    Args:
      graphdef, params: a GPT-NeoX with ``score_head=True`` that shares the policy's tokenizer.
      micro_batch_size: rows per forward pass (``None``: the whole batch at once).

    Returns:
      a :class:`klq_jax.types.DeviceReward` (the rollout fuses it into its compiled program);
      calling it, ``reward_fn(prompt_ids [B, Tq], prompt_mask [B, Tq], response_ids [B, Tr],
      response_mask [B, Tr]) -> [B]`` float32, scores a batch directly. Prompts left-padded: the
      score is computed from the last prompt slot on, so a row that ends before it (an empty
      response after a right-padded prompt) scores NaN (:func:`reward_model_scores` refuses it).

    Example: see the module docstring.
    """
    if not nnx.merge(graphdef, params).config.score_head:
        raise ValueError(
            "make_rm_reward_fn needs a reward model with a score head (load a "
            "GPTNeoXForSequenceClassification checkpoint)."
        )

    rollout.check_micro_batch_size(micro_batch_size)
    return DeviceReward(_rm_device_fn(graphdef, micro_batch_size), params)


def make_score_ids_fn(
    graphdef: nnx.GraphDef, params: nnx.State, *, label: str | None = None
) -> Callable[[Array, Array], Array]:
    """Jitted ``(ids [b, L] int32, mask [b, L]) -> scores [b]`` float32 of a reward model.

    Works for :mod:`klq_jax.models.gpt2`, :mod:`klq_jax.models.gpt_neox` and
    :mod:`klq_jax.models.llama` models built with a score head, and for a
    :mod:`klq_jax.models.distilbert` classifier, whose score is the logit of class ``label``
    (default ``"POSITIVE"``; the id comes from the model's ``config.label2id``). One compile per
    ``(b, L)``.

    Example::

        >>> import jax, jax.numpy as jnp
        >>> from klq_jax.models import gpt2
        >>> g, p = gpt2.init(gpt2.GPT2Config.tiny(), jax.random.key(0))
        >>> make_score_ids_fn(g, p)(jnp.array([[3, 4, 0]]), jnp.array([[1, 1, 0]])).shape
        (1,)
    """
    cfg = nnx.merge(graphdef, params).config
    if hasattr(cfg, "labels"):  # a classifier: one label's logit
        label_id = cfg.label_id(label or "POSITIVE")

        @jax.jit
        def score_ids(params, ids, mask):
            return nnx.merge(graphdef, params)(ids, mask).logits[:, label_id].astype(jnp.float32)

        return lambda ids, mask: score_ids(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.float32))
    if label is not None:
        raise ValueError(f"label={label!r} needs a classifier; this {type(cfg).__name__} model has one score.")
    if not getattr(cfg, "score_head", False):
        raise ValueError("make_score_ids_fn needs a model with a score head (a *ForSequenceClassification checkpoint).")

    @jax.jit
    def score_ids(params, ids, mask):
        return nnx.merge(graphdef, params)(ids, mask, logits=False).scores.astype(jnp.float32)

    return lambda ids, mask: score_ids(params, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.float32))


# ------------------------------------------------------------------------------------------
# Another tokenizer: decode, re-tokenise, bucket, score
# ------------------------------------------------------------------------------------------


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def decode_rollout_texts(
    tokenizer,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    *,
    stop_token_ids: Sequence[int] = (),
    joint: bool = False,
) -> tuple[list[str], list[str]] | tuple[list[str], list[str], list[str]]:
    """``(prompt texts, response texts)`` of a rollout batch, decoded with the POLICY tokenizer;
    with ``joint``, a third list: each prompt + response decoded TOGETHER (a character whose bytes
    straddle the prompt/response boundary stays whole, where the two separate texts each hold a
    U+FFFD).

    The prompt text is the decoded real (mask 1) prompt tokens. The response text is the decoded
    real response tokens without a final stop token (a row whose last real token is in
    ``stop_token_ids`` stopped; the stop token is not part of the reply). Special tokens are
    skipped and spaces are not cleaned up, so the text is exactly what was generated.

    Args:
      tokenizer: the policy's tokenizer.
      prompt_ids, prompt_mask: ``[B, Tq]``; response_ids, response_mask: ``[B, Tr]``.
      stop_token_ids: the sampler's stop tokens.
      joint: also return the jointly decoded texts.

    Example::

        >>> make_tiny_tokenizer = fixtures.make_tiny_tokenizer  # test helpers (tests/helpers/fixtures.py)
        >>> tok = make_tiny_tokenizer()
        >>> p = tok(" Hi", add_special_tokens=False)["input_ids"]; r = tok(" there", add_special_tokens=False)["input_ids"]
        >>> decode_rollout_texts(tok, [p], [[1] * len(p)], [r + [0]], [[1] * (len(r) + 1)], stop_token_ids=(0,))
        ([' Hi'], [' there'])
    """
    pids, pmask = np.asarray(prompt_ids), np.asarray(prompt_mask) > 0
    rids, rmask = np.asarray(response_ids), np.asarray(response_mask) > 0
    if pids.ndim != 2 or pids.shape != pmask.shape or rids.ndim != 2 or rids.shape != rmask.shape or (
        pids.shape[0] != rids.shape[0]
    ):
        raise ValueError(
            f"expected prompt_ids/prompt_mask [B, Tq] and response_ids/response_mask [B, Tr]; got "
            f"{pids.shape}, {pmask.shape}, {rids.shape}, {rmask.shape}."
        )
    stops = {int(s) for s in stop_token_ids}
    prompt_tokens, response_tokens = [], []
    for b in range(pids.shape[0]):
        prompt_tokens.append(pids[b][pmask[b]].tolist())
        resp = rids[b][rmask[b]].tolist()
        if resp and resp[-1] in stops:
            resp = resp[:-1]
        response_tokens.append(resp)
    texts = ([_decode(tokenizer, t) for t in prompt_tokens], [_decode(tokenizer, t) for t in response_tokens])
    if joint:
        texts += ([_decode(tokenizer, p + r) for p, r in zip(prompt_tokens, response_tokens)],)
    return texts


InputFormat = Literal["pair", "concat"] | Callable[[str, str], Any]


@dataclasses.dataclass
class RMInputs:
    """The reward model's inputs for one batch (host side, before padding).

    Attributes:
      token_ids: ``B`` lists of RM token ids (already truncated to ``max_length``).
      prompts, responses: the decoded texts the ids were made from.
      num_truncated: rows that were longer than ``max_length`` and lost their first tokens.
    """

    token_ids: list[list[int]]
    prompts: list[str]
    responses: list[str]
    num_truncated: int


def _encode_rm(reward_tokenizer, q: str, a: str, qa: str | None, input_format: InputFormat) -> list[int]:
    """The RM's ids of one row; ``qa``: prompt + response decoded together (for ``"concat"``)."""
    if callable(input_format):
        out = input_format(q, a)
        if isinstance(out, str):
            return list(reward_tokenizer(out)["input_ids"])
        if isinstance(out, tuple):
            return list(reward_tokenizer(*out)["input_ids"])
        return [int(i) for i in out]
    if input_format == "pair":
        return list(reward_tokenizer(q, a)["input_ids"])
    if input_format == "concat":
        return list(reward_tokenizer(q + a if qa is None else qa)["input_ids"])
    raise ValueError(f"input_format must be 'pair', 'concat' or a callable, got {input_format!r}.")


def build_rm_inputs(
    policy_tokenizer,
    reward_tokenizer,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    *,
    stop_token_ids: Sequence[int] = (),
    input_format: InputFormat = "pair",
    max_length: int,
) -> RMInputs:
    """Decode a rollout batch with the policy tokenizer and re-tokenise it for the reward model.

    ``q, a`` come from :func:`decode_rollout_texts`; the ids are ``reward_tokenizer(q, a)``
    (``"pair"``: Ray2333/gpt2-large-helpful-reward_model's format, rlhf_facts.md §4),
    ``reward_tokenizer(decode(prompt + response ids))`` (``"concat"``: ``q + a``, except that a
    character split at the prompt/response boundary stays whole), or from ``input_format(q, a)`` returning a text, a
    ``(text, text_pair)`` tuple or the ids themselves. Rows with more than ``max_length`` ids keep
    their last ``max_length`` ids.

    Example::

        >>> make_tiny_tokenizer, make_tiny_gpt2_tokenizer = fixtures.make_tiny_tokenizer, fixtures.make_tiny_gpt2_tokenizer  # test helpers (tests/helpers/fixtures.py)
        >>> pt, rt = make_tiny_tokenizer(), make_tiny_gpt2_tokenizer()
        >>> p = pt("\\n\\nHuman: Hi\\n\\nAssistant:", add_special_tokens=False)["input_ids"]
        >>> r = pt(" Hello.", add_special_tokens=False)["input_ids"] + [0]
        >>> x = build_rm_inputs(pt, rt, [p], [[1] * len(p)], [r], [[1] * len(r)], stop_token_ids=(0,), max_length=64)
        >>> x.token_ids[0] == rt("\\n\\nHuman: Hi\\n\\nAssistant:", " Hello.")["input_ids"], x.responses
        (True, [' Hello.'])
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}.")
    concat = isinstance(input_format, str) and input_format == "concat"
    prompts, responses, *joint = decode_rollout_texts(
        policy_tokenizer, prompt_ids, prompt_mask, response_ids, response_mask, stop_token_ids=stop_token_ids,
        joint=concat,
    )
    token_ids, truncated = [], 0
    for q, a, qa in zip(prompts, responses, joint[0] if joint else [None] * len(prompts)):
        ids = _encode_rm(reward_tokenizer, q, a, qa, input_format)
        if len(ids) > max_length:
            ids = ids[-max_length:]
            truncated += 1
        if not ids:
            raise ValueError(
                f"The reward model's tokenizer gave no tokens for prompt {q!r} and response {a!r}; "
                "the reward model needs at least one token per row."
            )
        token_ids.append(ids)
    return RMInputs(token_ids=token_ids, prompts=prompts, responses=responses, num_truncated=truncated)


def bucket_width(length: int, *, min_bucket: int = 16, max_length: int | None = None) -> int:
    """The padded width for a longest row of ``length`` tokens: the next power of two, at least
    ``min_bucket``, at most ``max_length``.

    Example::

        >>> bucket_width(17), bucket_width(3), bucket_width(300, max_length=512), bucket_width(300, max_length=400)
        (32, 16, 512, 400)
    """
    w = max(int(min_bucket), 1)
    while w < length:
        w *= 2
    if max_length is not None:
        w = min(w, int(max_length))
    if w < length:
        raise ValueError(f"a row of {length} tokens does not fit max_length={max_length}.")
    return w


def pad_rows(
    token_ids: Sequence[Sequence[int]],
    width: int,
    *,
    num_rows: int | None = None,
    pad_id: int = 0,
    padding_side: Literal["right", "left"] = "right",
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n, width] int32, mask [n, width] float32)``: rows padded on ``padding_side``; with
    ``num_rows`` > ``len(token_ids)`` the batch is filled up with dummy rows (mask 1 on one slot).

    Example::

        >>> ids, mask = pad_rows([[5, 6], [7]], 3, num_rows=3, pad_id=9, padding_side="left")
        >>> ids.tolist(), mask.tolist()
        ([[9, 5, 6], [9, 9, 7], [9, 9, 9]], [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
    n = len(token_ids) if num_rows is None else int(num_rows)
    if n < len(token_ids):
        raise ValueError(f"num_rows={num_rows} is less than the {len(token_ids)} rows given.")
    ids = np.full((n, width), pad_id, np.int32)
    mask = np.zeros((n, width), np.float32)
    for i in range(n):
        row = list(token_ids[i]) if i < len(token_ids) else [pad_id]
        k = len(row)
        if k > width:
            raise ValueError(f"row {i} has {k} tokens, more than the width {width}.")
        sl = slice(0, k) if padding_side == "right" else slice(width - k, width)
        ids[i, sl] = row
        mask[i, sl] = 1.0
    return ids, mask


class CrossTokenizerRewardFn:
    """A ``reward_fn`` for a reward model with another tokenizer (see the module docstring).

    Args:
      score_ids_fn: ``(ids [b, L] int32, mask [b, L] float32) -> [b]``, e.g.
        :func:`make_score_ids_fn` of a GPT-2 reward model (tests inject their own).
      policy_tokenizer, reward_tokenizer: the two tokenizers.
      stop_token_ids: the sampler's stop tokens (dropped from the response text).
      max_length: the RM's context (GPT-2: ``n_positions``); longer inputs keep their last tokens.
      micro_batch_size: rows per scorer call (every call gets exactly this many rows).
      input_format: ``"pair"``, ``"concat"`` or a callable (see :func:`build_rm_inputs`).
      padding_side: where the RM inputs are padded (the scores do not depend on it).
      min_bucket: the smallest padded width.
      pad_id: id written in padding slots (default: the RM tokenizer's pad, else its EOS, else 0;
        it never matters, the mask decides).

    Attributes:
      num_truncated: rows truncated so far (all calls); ``last_inputs``: the :class:`RMInputs`
        of the latest call.
    """

    def __init__(
        self,
        score_ids_fn: Callable[[Array, Array], Array],
        policy_tokenizer,
        reward_tokenizer,
        *,
        stop_token_ids: Sequence[int] = (),
        max_length: int = 1024,
        micro_batch_size: int = 16,
        input_format: InputFormat = "pair",
        padding_side: Literal["right", "left"] = "right",
        min_bucket: int = 16,
        pad_id: int | None = None,
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}.")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.score_ids_fn = score_ids_fn
        self.policy_tokenizer = policy_tokenizer
        self.reward_tokenizer = reward_tokenizer
        self.stop_token_ids = tuple(int(s) for s in stop_token_ids)
        self.max_length = int(max_length)
        self.micro_batch_size = int(micro_batch_size)
        self.input_format = input_format
        self.padding_side = padding_side
        self.min_bucket = int(min_bucket)
        if pad_id is None:
            pad_id = next(
                (i for i in (getattr(reward_tokenizer, "pad_token_id", None),
                             getattr(reward_tokenizer, "eos_token_id", None)) if i is not None),
                0,
            )
        self.pad_id = int(pad_id)
        self.num_truncated = 0
        self.last_inputs: RMInputs | None = None

    def rm_inputs(self, prompt_ids, prompt_mask, response_ids, response_mask) -> RMInputs:
        """The RM's token ids (and texts) for a rollout batch; see :func:`build_rm_inputs`."""
        return build_rm_inputs(
            self.policy_tokenizer, self.reward_tokenizer, prompt_ids, prompt_mask, response_ids,
            response_mask, stop_token_ids=self.stop_token_ids, input_format=self.input_format,
            max_length=self.max_length,
        )

    def score_token_ids(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores ``[N]`` float32 of RM token-id lists: sorted by length, bucketed, micro-batched."""
        n = len(token_ids)
        order = np.argsort([-len(t) for t in token_ids], kind="stable")
        out = np.zeros(n, np.float32)
        mb = self.micro_batch_size
        for lo in range(0, n, mb):
            rows = order[lo : lo + mb]
            chunk = [token_ids[i] for i in rows]
            width = bucket_width(max(len(t) for t in chunk), min_bucket=self.min_bucket, max_length=self.max_length)
            ids, mask = pad_rows(chunk, width, num_rows=mb, pad_id=self.pad_id, padding_side=self.padding_side)
            scores = np.asarray(self.score_ids_fn(ids, mask), np.float32)
            if scores.shape != (mb,):
                raise ValueError(f"score_ids_fn returned shape {scores.shape}, expected ({mb},).")
            out[rows] = scores[: len(rows)]
        return out

    def __call__(self, prompt_ids, prompt_mask, response_ids, response_mask) -> Array:
        """``R_φ(x, y)`` ``[B]`` float32 (no ω penalty)."""
        inputs = self.rm_inputs(prompt_ids, prompt_mask, response_ids, response_mask)
        self.last_inputs = inputs
        if inputs.num_truncated:
            self.num_truncated += inputs.num_truncated
            logger.warning(
                "reward model: %d of %d inputs were longer than max_length=%d tokens and were truncated "
                "from the left (%d so far)", inputs.num_truncated, len(inputs.token_ids), self.max_length,
                self.num_truncated,
            )
        return jnp.asarray(self.score_token_ids(inputs.token_ids))


def make_cross_tokenizer_reward_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    policy_tokenizer,
    reward_tokenizer,
    *,
    max_length: int | None = None,
    label: str | None = None,
    **kwargs,
) -> CrossTokenizerRewardFn:
    """:class:`CrossTokenizerRewardFn` over a reward model (see :func:`make_score_ids_fn`).

    ``max_length`` defaults to the model's context (GPT-2 ``n_positions``, otherwise
    ``max_position_embeddings``); ``label`` picks a classifier's class (IMDb: ``"POSITIVE"``); other
    keywords go to :class:`CrossTokenizerRewardFn`.

    Example::

        >>> from klq_jax.models import hf                                                 # doctest: +SKIP
        >>> cfg, g, p = hf.load_hf("gpt2-large-helpful-reward_model/")                    # doctest: +SKIP
        >>> reward_fn = make_cross_tokenizer_reward_fn(g, p, policy_tok, rm_tok,          # doctest: +SKIP
        ...                                            stop_token_ids=(0,), micro_batch_size=16)
    """
    if max_length is None:
        cfg = nnx.merge(graphdef, params).config
        max_length = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings")
    return CrossTokenizerRewardFn(
        make_score_ids_fn(graphdef, params, label=label), policy_tokenizer, reward_tokenizer,
        max_length=max_length, **kwargs,
    )


@functools.lru_cache(maxsize=None)
def _programmatic_fn(kind: str, target_token: int) -> Callable:
    if kind == "target_token":

        def fn(params, prompt_ids, prompt_mask, response_ids, response_mask, groups):
            m = response_mask.astype(jnp.float32)
            hits = (response_ids == target_token).astype(jnp.float32) * m
            return hits.sum(1) / jnp.maximum(m.sum(1), 1.0)

    elif kind == "low_tokens":

        def fn(params, prompt_ids, prompt_mask, response_ids, response_mask, groups):
            m = response_mask.astype(jnp.float32)
            low = (response_ids >= 1) & (response_ids < target_token)
            return (low.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

    elif kind == "length":

        def fn(params, prompt_ids, prompt_mask, response_ids, response_mask, groups):
            return response_mask.astype(jnp.float32).sum(1) / response_mask.shape[1]

    else:
        raise ValueError(
            f"Unknown programmatic reward {kind!r}; choose 'target_token', 'low_tokens' or 'length'"
        )
    return fn


def programmatic_reward(kind: str, *, target_token: int = 7) -> DeviceReward:
    """A programmatic ``R(x, y)`` ``[B]`` float32, computed on the device (a
    :class:`klq_jax.types.DeviceReward`: the rollout fuses it; calling it scores a batch).

    ``"target_token"``: fraction of real response tokens equal to ``target_token``.
    ``"low_tokens"``: fraction of real response tokens with ids in ``[1, target_token)``.
    ``"length"``: response length divided by the response width.

    Example:
      >>> import jax.numpy as jnp
      >>> from klq_jax.rewards import programmatic_reward
      >>> r = programmatic_reward("target_token", target_token=7)
      >>> s = r(jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2)), jnp.array([[7, 3, 7, 0]]),
      ...       jnp.array([[1.0, 1.0, 1.0, 0.0]]))
      >>> round(float(s[0]), 6)
      0.666667
    """
    return DeviceReward(_programmatic_fn(kind, int(target_token)))
