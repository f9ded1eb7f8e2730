"""The paper presets end to end on tiny local stand-ins for every hub model and dataset.

Every hub name of the presets (policies, reward models, datasets) is replaced by a tiny checkpoint
or dataset in the real format, written under a temporary directory that ``KLQ_LOCAL_MODELS`` points
at, under the SAME hub names. Each preset then runs one full iteration of :func:`klq_jax.train.train`
(sample, score with the real reward-model path, targets, update, checkpoint), and a TL;DR run is
interrupted and resumed to check that the prompt iterator continues at the same prompt.
"""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

from experiments import presets, tasks
from klq_jax import rewards, sharding, train
from klq_jax.checkpoint import Checkpointer
from tests.helpers import fixtures

import torch  # test-time reference (the .[test] extra)
import transformers

TLDR_Q = 80  # TL;DR query budget of the tiny runs (the fixture rows are truncated to fit)
HH_Q = 48  # HH prompt budget (the fixture's 500-token prompt is dropped)


def _llama3_rope():
    from tests.helpers.testing import TINY_LLAMA3_ROPE

    return dict(TINY_LLAMA3_ROPE)


def _tiny_gpt2_rm(directory, vocab_size, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                  num_labels=1, bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1)
    model = transformers.GPT2ForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.5)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def local_hub(tmp_path_factory):
    """tiny copies of every hub name of the four presets; KLQ_LOCAL_MODELS points at them."""
    from tests.helpers.testing import tiny_hf_gpt_neox, tiny_hf_gpt_neox_reward

    root = tmp_path_factory.mktemp("hub")
    tok = fixtures.make_tiny_tokenizer()  # Pythia-like: EOS 0, [PAD] the last id
    rm_tok = fixtures.make_tiny_gpt2_tokenizer()  # GPT-2-like: another vocabulary, no pad
    vocab = len(tok) + 8  # like Pythia, the embedding has more rows than the tokenizer has tokens
    t, h = presets.TLDR_TASK, presets.HH_TASK

    tiny_hf_gpt_neox(root / t.policy, vocab_size=vocab, seed=1)
    tok.save_pretrained(root / t.policy)
    tiny_hf_gpt_neox_reward(root / t.reward_model, vocab_size=vocab, seed=2, pad_token_id=tok.pad_token_id)
    tok.save_pretrained(root / t.reward_model)
    fixtures.write_tiny_tldr(root / t.dataset, tok, n=8, query_length=TLDR_Q)

    tiny_hf_gpt_neox(root / h.policy, vocab_size=vocab, seed=3)
    no_pad = fixtures.make_tiny_tokenizer()
    no_pad.pad_token = None  # the build adds "[PAD]" as TRL does
    no_pad.save_pretrained(root / h.policy)
    _tiny_gpt2_rm(root / h.reward_model, len(rm_tok))
    rm_tok.save_pretrained(root / h.reward_model)
    fixtures.write_tiny_hh(root / h.dataset, n=10, data_dir=h.dataset_subset)

    # IMDb: a Llama policy whose embedding is exactly its tokenizer (no room for "[PAD]", as
    # Llama-3.2-1B), a DistilBERT sentiment classifier with its own WordPiece tokenizer.
    from tests.helpers.testing import tiny_hf_distilbert, tiny_hf_llama

    m = presets.IMDB_TASK
    llama_tok = fixtures.make_tiny_llama_tokenizer()
    tiny_hf_llama(root / m.policy, vocab_size=len(llama_tok), seed=4, pad_token_id=None,
                  bos_token_id=llama_tok.bos_token_id, eos_token_id=llama_tok.eos_token_id,
                  tie_word_embeddings=True, rope_parameters=_llama3_rope())
    llama_tok.save_pretrained(root / m.policy)
    bert_tok = fixtures.make_tiny_bert_tokenizer()
    tiny_hf_distilbert(root / m.reward_model, vocab_size=len(bert_tok), max_position_embeddings=64, seed=5)
    bert_tok.save_pretrained(root / m.reward_model)
    fixtures.write_tiny_imdb(root / m.dataset, n=8)

    # datasets caches a local directory under its base name (not its path), so another test's
    # "hh-rlhf" or "imdb" copy could be served instead of these: use a private cache.
    import datasets

    old_cache = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = root / "_datasets_cache"
    old = os.environ.get("KLQ_LOCAL_MODELS")
    os.environ["KLQ_LOCAL_MODELS"] = str(root)
    yield root
    datasets.config.HF_DATASETS_CACHE = old_cache
    if old is None:
        os.environ.pop("KLQ_LOCAL_MODELS", None)
    else:
        os.environ["KLQ_LOCAL_MODELS"] = old


def _tiny(name: str, out_dir, **kw) -> train.TrainConfig:
    cfg = presets.get(name)
    budget = TLDR_Q if cfg.task.kind == "tldr" else HH_Q
    base = dict(
        task=dataclasses.replace(cfg.task, max_prompt_len=budget),
        rollouts_per_batch=4, minibatch_size=4, micro_batch_size=2, total_episodes=4,
        max_new_tokens=6, score_micro_batch_size=2, out_dir=str(out_dir), progress=False,
        tensorboard=False, save_every=1,
        # float32 on CPU: the presets' bfloat16 compiles about twice as slowly here
        # (tests/test_gpt2.py and the model tests cover the reduced-precision paths).
    )
    base["task"] = dataclasses.replace(base["task"], dtype="float32")
    base.update(kw)
    return dataclasses.replace(cfg, **base)


def _mesh():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


class _Recorder:
    """Wraps a prompt iterator and records the dataset rows of every batch it serves."""

    def __init__(self, it):
        self.it, self.indices = it, []

    def __next__(self):
        batch = next(self.it)
        self.indices.append(batch["index"].tolist())
        return batch

    next = __next__

    def state_dict(self):
        return self.it.state_dict()

    def load_state_dict(self, state):
        self.it.load_state_dict(state)


@pytest.mark.parametrize("name", ["tldr-klq", "tldr-ppo", "hh-klq", "hh-ppo"])
def test_preset_runs_one_iteration(local_hub, tmp_path, name):
    cfg = _tiny(name, tmp_path / name)
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    if cfg.task.kind == "hh":
        assert isinstance(exp.reward_fn, rewards.CrossTokenizerRewardFn)
    else:
        assert not isinstance(exp.reward_fn, rewards.CrossTokenizerRewardFn)
    assert exp.stop_token_ids == (0,) and exp.pad_token_id == len(fixtures.make_tiny_tokenizer()) - 1
    result = train.train(cfg, exp, mesh=_mesh())

    assert len(result.history) == 1
    record = result.history[0]
    floats = {k: v for k, v in record.items() if isinstance(v, float)}
    assert floats and all(math.isfinite(v) for v in floats.values())
    assert record["episodes"] == 4 and 1 <= record["response_length"] <= 6
    assert abs(record["score"]) > 0  # a real reward model scored the samples
    ckpt = Checkpointer(os.path.join(cfg.out_dir, "checkpoints"))
    try:
        assert ckpt.latest_step() == 1
    finally:
        ckpt.close()
    with open(os.path.join(cfg.out_dir, "metrics.jsonl")) as f:
        assert len(f.readlines()) == 1
    if cfg.task.kind == "hh":
        seen = exp.reward_fn.last_inputs
        assert len(seen.prompts) == 4
        assert all(p.startswith("\n\nHuman:") and p.endswith("\n\nAssistant:") for p in seen.prompts)


def test_iterator_resumes_at_the_same_prompt(local_hub, tmp_path):
    """Train 1 iteration of 2 and checkpoint, stop, then resume for the 2nd: the 2nd batch is the
    one an uninterrupted run draws second (the trainer draws one batch per iteration from a fresh
    iterator of the same data and seed)."""

    class Stop(Exception):
        pass

    def stop_after_first(it, record, state):
        if it == 1:
            raise Stop

    def run(resume):
        cfg = _tiny("tldr-klq", tmp_path / "run", total_episodes=8, resume=resume)
        exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
        fresh = exp.prompts.__class__(exp.prompts.dataset, batch_size=4, seed=cfg.seed)
        uninterrupted = [next(fresh)["index"].tolist() for _ in range(2)]
        exp.prompts = _Recorder(exp.prompts)
        if resume:
            result = train.train(cfg, exp, mesh=_mesh())
        else:
            with pytest.raises(Stop):
                train.train(cfg, exp, mesh=_mesh(), on_iteration=stop_after_first)
            result = None
        return exp.prompts.indices, uninterrupted, result

    first, expected, _ = run(False)
    assert expected[0] != expected[1]
    assert first == expected[:1]
    resumed, expected2, r2 = run(True)
    assert expected2 == expected
    assert resumed == expected[1:]  # the restored iterator served the second batch, not the first
    assert [h["iteration"] for h in r2.history] == [2]
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    try:
        assert ckpt.latest_step() == 2
    finally:
        ckpt.close()


def test_missing_model_or_dataset_names_the_env_var(local_hub, tmp_path, monkeypatch):
    monkeypatch.setenv("KLQ_LOCAL_MODELS", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="KLQ_LOCAL_MODELS"):
        tasks.build_experiment(presets.TLDR_TASK, batch_size=4, seed=0)
    monkeypatch.setenv("KLQ_LOCAL_MODELS", str(local_hub))
    task = dataclasses.replace(presets.TLDR_TASK, dataset="nobody/missing-dataset", max_prompt_len=TLDR_Q)
    with pytest.raises(Exception, match="KLQ_LOCAL_MODELS") as info:
        tasks.build_experiment(task, batch_size=4, seed=0)
    assert "nobody/missing-dataset" in str(info.value)


@pytest.mark.parametrize("name", ["imdb-klq", "imdb-ppo"])
def test_imdb_preset_runs_one_iteration(local_hub, tmp_path, name):
    """Llama policy + DistilBERT reward on tiny local stand-ins: one full iteration; the reward model
    sees exactly decode(prompt) + decode(response without EOS), re-tokenised by its own tokenizer,
    and scores its POSITIVE logit; the exported policy is a Llama transformers loads."""
    from transformers import AutoTokenizer

    from tests.helpers import testing
    from klq_jax.models import llama

    cfg = _tiny(name, tmp_path / name)
    assert cfg.task.prompt_length_range == (2, 8) and cfg.max_new_tokens == 6
    exp = tasks.build_experiment(cfg.task, batch_size=cfg.rollouts_per_batch, seed=cfg.seed)
    assert isinstance(exp.reward_fn, rewards.CrossTokenizerRewardFn)
    policy_dir, rm_dir = local_hub / cfg.task.policy, local_hub / cfg.task.reward_model
    ptok, rtok = AutoTokenizer.from_pretrained(policy_dir), AutoTokenizer.from_pretrained(rm_dir)
    assert exp.stop_token_ids == (ptok.eos_token_id,) and exp.pad_token_id == ptok.eos_token_id  # pad = EOS
    assert isinstance(nnx_config(exp), llama.LlamaConfig)
    calls = []
    inner = exp.reward_fn

    def recording_reward_fn(*args):
        out = inner(*args)
        calls.append(([np.asarray(a) for a in args], np.asarray(out), inner.last_inputs))
        return out

    exp.reward_fn = recording_reward_fn
    result = train.train(cfg, exp, mesh=_mesh())
    assert len(result.history) == 1 and math.isfinite(result.history[0]["score"])

    rm = transformers.AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    pos = rm.config.label2id["POSITIVE"]
    (pids, pmask, rids, rmask), scores, seen = calls[0]
    for b in range(len(pids)):
        prompt = ptok.decode(pids[b][pmask[b] > 0].tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        resp = rids[b][rmask[b] > 0].tolist()
        if resp and resp[-1] == ptok.eos_token_id:
            resp = resp[:-1]
        text = prompt + ptok.decode(resp, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert seen.prompts[b] + seen.responses[b] == text
        assert seen.token_ids[b] == rtok(text)["input_ids"]
        with torch.no_grad():
            logit = rm(input_ids=torch.as_tensor([rtok(text)["input_ids"]])).logits[0, pos].item()
        assert abs(float(scores[b]) - logit) <= 1e-4
    assert np.std(scores) > 0  # different texts, different rewards

    back = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(cfg.out_dir, "policy")).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    tokens, mask = testing.make_left_padded_batch(0, 2, 6, back.config.vocab_size, [6, 3])
    ours = np.asarray(llama.apply(result.graphdef, result.state.params, tokens, mask).logits)
    np.testing.assert_allclose(testing.hf_forward(back, tokens, mask) * mask[..., None], ours * mask[..., None],
                               atol=1e-4, rtol=0)


def nnx_config(exp):
    from flax import nnx

    return nnx.merge(exp.graphdef, exp.params).config


def test_imdb_with_a_gpt_neox_rm_and_an_unsupported_rm(local_hub, tmp_path):
    imdb_dir = fixtures.write_tiny_imdb(tmp_path / "imdb", n=8)
    t = presets.TLDR_TASK
    task = tasks.TaskConfig(kind="imdb", policy=t.policy, reward_model=t.reward_model, dataset=imdb_dir)
    exp = tasks.build_experiment(task, batch_size=2, seed=0)
    batch = next(exp.prompts)
    assert batch["prompt_ids"].shape == (2, 7)
    r = np.zeros((2, 3), np.int32) + 5
    scores = np.asarray(exp.reward_fn(batch["prompt_ids"], batch["prompt_mask"], r, np.ones((2, 3), np.float32)))
    assert scores.shape == (2,) and np.all(np.isfinite(scores))

    bert = tmp_path / "bert-mlm"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="BertForMaskedLM, which is not supported as a reward model"):
        tasks.build_experiment(dataclasses.replace(task, reward_model=str(bert)), batch_size=2, seed=0)
    # A DistilBERT reward model asked for a label it does not have.
    m = presets.IMDB_TASK
    bad = dataclasses.replace(task, reward_model=m.reward_model, reward_label="JOY")
    with pytest.raises(ValueError, match=r"reward_label='JOY' is not a label.*\['NEGATIVE', 'POSITIVE'\]"):
        tasks.build_experiment(bad, batch_size=2, seed=0)


def test_policy_tokenizer_pad_must_fit_the_embedding(tmp_path):
    d = tmp_path / "tok"
    fixtures.make_tiny_gpt2_tokenizer(d)  # no pad token: "[PAD]" is added as id 384
    tok = tasks.load_policy_tokenizer(str(d), vocab_size=385)
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == 384
    with pytest.raises(ValueError, match="embedding has only 384 rows"):
        tasks.load_policy_tokenizer(str(d), vocab_size=384)


def test_imdb_validation_prompts_do_not_depend_on_the_training_seed(local_hub):
    """Issue data F8: IMDb's validation prefix lengths come from a constant seed, not --seed (the
    training prompts do follow --seed)."""
    task = dataclasses.replace(presets.get("imdb-klq").task, dtype="float32")
    a, b = (tasks.build_experiment(task, batch_size=2, seed=s, validation_prompts=3) for s in (0, 1))
    np.testing.assert_array_equal(a.validation_prompts.prompt_ids, b.validation_prompts.prompt_ids)
    assert a.validation_prompts.prompt_texts == b.validation_prompts.prompt_texts
    assert a.prompts.dataset.lengths.tolist() != b.prompts.dataset.lengths.tolist()
