"""Issue 11, fault 1: every model source kind honours the loading options (dtype first of all).

A ``klq-convert hf-to-flax`` directory (and a run's exported ``policy/``) used to come back in the
dtype stored in it, whatever ``dtype`` asked for; the original HF directory honoured it. The compute
dtype is read off a forward pass (the dtype of the hidden states), not off the config alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import tasks
from klq_jax import sharding
from klq_jax.models import load
from tests.helpers import testing
from klq_jax.models import gpt2, gpt_neox, hf
from klq_jax.models import critic as critic_lib

VOCAB = 64
TOKENS = jnp.array([[0, 3, 4, 5], [6, 7, 8, 9]])
MASK = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]])


def _hidden_dtype(graphdef, params):
    return gpt_neox.apply(graphdef, params, TOKENS, MASK, logits=False).hidden.dtype


def _param_dtypes(params):
    return {x.dtype for x in jax.tree_util.tree_leaves(params)}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every source kind on disk: HF LM, HF LM + value_head.safetensors, klq LM, klq LM + value
    head (what a run exports as ``policy/``), klq LM stored in bfloat16, HF RM, klq RM, GPT-2 RM."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("sources")
    out = {}
    out["hf"] = str(root / "hf")
    testing.tiny_hf_gpt_neox(out["hf"], vocab_size=VOCAB, seed=1)
    cfg, gd, params = hf.load_hf(out["hf"], value_head=True, key=jax.random.key(5))
    out["hf_vh"] = str(root / "hf_vh")
    hf.save_hf(out["hf_vh"], cfg, params)
    out["klq"] = str(root / "klq")
    lm_cfg, _, lm_params = hf.load_hf(out["hf"])
    hf.save_flax(out["klq"], lm_cfg, lm_params)
    out["klq_vh"] = str(root / "klq_vh")
    hf.save_flax(out["klq_vh"], cfg, params)
    out["klq_bf16"] = str(root / "klq_bf16")
    hf.save_flax(out["klq_bf16"], cfg.replace(dtype="bfloat16"), params)
    out["hf_rm"] = str(root / "hf_rm")
    testing.tiny_hf_gpt_neox_reward(out["hf_rm"], vocab_size=VOCAB, seed=2)
    out["klq_rm"] = str(root / "klq_rm")
    rm_cfg, _, rm_params = hf.load_hf(out["hf_rm"])
    hf.save_flax(out["klq_rm"], rm_cfg, rm_params)
    out["gpt2_rm"] = str(root / "gpt2_rm")
    torch.manual_seed(0)
    gcfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2,
                                   num_labels=1, pad_token_id=0)
    transformers.GPT2ForSequenceClassification(gcfg).save_pretrained(out["gpt2_rm"])
    return out


POLICY_KINDS = ["random:tiny", "hf", "hf_vh", "klq", "klq_vh", "klq_bf16"]


@pytest.mark.parametrize("value_head", [False, True])
@pytest.mark.parametrize("kind", POLICY_KINDS)
def test_every_policy_source_honours_dtype_and_value_head(sources, kind, value_head):
    source = sources.get(kind, kind)
    for dtype in ("bfloat16", "float32"):
        cfg, gd, params = load.load_model(source, key=jax.random.key(0), value_head=value_head, dtype=dtype)
        assert cfg.dtype == dtype and _hidden_dtype(gd, params) == jnp.dtype(dtype), (kind, dtype)
        assert _param_dtypes(params) == {jnp.dtype(jnp.float32)}  # master weights stay float32
        assert cfg.value_head == value_head and ("value_kernel" in nnx.to_pure_dict(params)) == value_head
        out = gpt_neox.apply(gd, params, TOKENS, MASK, logits=False)
        assert (out.values is not None) == value_head


def test_value_head_and_param_dtype_options(sources):
    """A head stored with the checkpoint is read back; a missing one is gpt_neox.init_value_head(key)
    on every path (the HF reader and the klq reader give the same head for the same key)."""
    key = jax.random.key(7)
    _, _, stored = load.load_model(sources["klq"], key=key)
    _, _, p_vh = load.load_model(sources["hf_vh"], key=key, value_head=True)
    _, _, saved = hf.load_hf(sources["hf"], value_head=True, key=jax.random.key(5))
    np.testing.assert_array_equal(p_vh["value_kernel"][...], saved["value_kernel"][...])
    fresh = gpt_neox.init_value_head(gpt_neox.GPTNeoXConfig.tiny(), key)
    for kind in ("hf", "klq"):
        _, _, p = load.load_model(sources[kind], key=key, value_head=True)
        np.testing.assert_array_equal(p["value_kernel"][...], fresh["value_kernel"])
        assert float(p["value_bias"][...]) == 0.0
        np.testing.assert_array_equal(p["embed_in"][...], stored["embed_in"][...])
    for kind in ("hf", "klq_vh"):
        _, _, p = load.load_model(sources[kind], key=key, value_head=True, param_dtype="bfloat16")
        assert _param_dtypes(p) == {jnp.dtype(jnp.bfloat16)}
    with pytest.raises(ValueError, match="PRNG key"):
        load.apply_model_options(gpt_neox.GPTNeoXConfig.tiny(), stored, value_head=True)


def test_mesh_option_on_every_source(sources):
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    for kind in ("random:tiny", "hf", "klq_vh"):
        cfg, gd, params = load.load_model(sources.get(kind, kind), key=jax.random.key(0), value_head=True,
                                           dtype="bfloat16", mesh=mesh)
        assert _hidden_dtype(gd, params) == jnp.bfloat16
        for leaf in jax.tree_util.tree_leaves(params):
            assert isinstance(leaf.sharding, jax.sharding.NamedSharding) and leaf.sharding.mesh == mesh


@pytest.mark.parametrize("kind", ["hf_rm", "klq_rm", "gpt2_rm"])
def test_reward_model_sources_honour_dtype(sources, kind):
    task = tasks.TaskConfig(kind="tldr", reward_model=sources[kind], dtype="bfloat16")
    arch, cfg, gd, params = tasks.load_reward_model(task, key=jax.random.key(0))
    assert cfg.dtype == "bfloat16"
    if arch == "GPT2ForSequenceClassification":
        assert gpt2.apply(gd, params, TOKENS, MASK, logits=False).hidden.dtype == jnp.bfloat16
    else:
        assert cfg.score_head and _hidden_dtype(gd, params) == jnp.bfloat16


@pytest.mark.parametrize("ref_kind", ["hf", "klq", "klq_vh"])
@pytest.mark.parametrize("critic_kind", ["hf_rm", "klq_rm"])
def test_policy_reference_and_critic_of_a_task_honour_dtype(sources, ref_kind, critic_kind):
    """``--task.dtype bfloat16 --task.policy <klq dir>``: policy, π_b and critic all compute in bf16."""
    task = tasks.TaskConfig(kind="synthetic", policy=sources["klq_bf16" if ref_kind == "hf" else "klq"],
                            reference=sources[ref_kind], critic=sources[critic_kind], dtype="bfloat16",
                            num_prompts=4, prompt_len=4)
    exp = tasks.build_experiment(task, batch_size=2, seed=0)
    model = nnx.merge(exp.graphdef, exp.params)
    assert isinstance(model, critic_lib.PolicyWithCritic)
    assert model.policy(TOKENS, MASK, logits=False).hidden.dtype == jnp.bfloat16
    assert model.critic(TOKENS, MASK, logits=False).hidden.dtype == jnp.bfloat16
    assert _hidden_dtype(exp.ref_graphdef, exp.ref_params) == jnp.bfloat16
    # Without a critic, the policy keeps its own value head, in bf16 too.
    exp = tasks.build_experiment(dataclasses.replace(task, critic=None), batch_size=2, seed=0)
    out = gpt_neox.apply(exp.graphdef, exp.params, TOKENS, MASK, logits=False)
    assert out.hidden.dtype == jnp.bfloat16 and out.values is not None


def test_synthetic_task_warns_that_it_ignores_a_reward_model(sources, caplog):
    """--task.reward-model on the synthetic task (programmatic reward): one warning naming it; none
    without one."""
    task = tasks.TaskConfig(kind="synthetic", policy="random:tiny", num_prompts=4, prompt_len=4)
    for t, warned in ((dataclasses.replace(task, reward_model=sources["hf_rm"]), True), (task, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="experiments.tasks"):
            tasks.build_experiment(t, batch_size=2, seed=0)
        lines = [r.getMessage() for r in caplog.records if "ignores --task.reward-model" in r.getMessage()]
        assert len(lines) == int(warned) and all(sources["hf_rm"] in l and "\n" not in l for l in lines)
