"""DistilBERT sequence classifier in Flax against transformers' DistilBertForSequenceClassification."""

import json

import numpy as np
import pytest

import jax
import torch  # test-time reference (the .[test] extra)

from tests.helpers import testing
from klq_jax.models import distilbert, hf

ATOL = 1e-4


@pytest.fixture(scope="module")
def clf(tmp_path_factory):
    d = tmp_path_factory.mktemp("distilbert")
    model = testing.tiny_hf_distilbert(d, seed=3)
    config, graphdef, params = hf.load_hf(d, strict=True)
    return d, model, config, graphdef, params


def test_config_from_hf(clf):
    d, model, config, _, _ = clf
    assert config.labels == ("NEGATIVE", "POSITIVE") and config.num_labels == 2
    assert config.label_id("POSITIVE") == json.loads((d / "config.json").read_text())["label2id"]["POSITIVE"]
    assert (config.dim, config.n_layers, config.n_heads, config.hidden_dim) == (32, 2, 4, 48)


def test_logits_match_hf_on_padded_batch(clf):
    _, model, config, graphdef, params = clf
    rng = np.random.default_rng(0)
    B, T = 4, 11
    lengths = [11, 8, 4, 1]
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.int32)  # right padding, as HF pads
    tokens = (rng.integers(1, 64, (B, T)) * mask).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits.numpy()
    ours = np.asarray(jax.jit(distilbert.apply, static_argnums=0)(graphdef, params, tokens, mask).logits)
    assert ours.shape == (B, 2) and ours.dtype == np.float32
    assert np.std(ref[:, 1]) > 0.05  # rows differ: the comparison means something
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    # Left padding gives the same logits (positions from the mask, [CLS] = first real token).
    left = np.zeros_like(tokens)
    lmask = np.zeros_like(mask)
    for b, n in enumerate(lengths):
        left[b, T - n:], lmask[b, T - n:] = tokens[b, :n], 1
    np.testing.assert_allclose(np.asarray(distilbert.apply(graphdef, params, left, lmask).logits), ref, atol=ATOL)
    pos = config.label_id("POSITIVE")
    np.testing.assert_allclose(
        np.asarray(distilbert.score(graphdef, params, tokens, mask, label=pos)), ref[:, pos], atol=ATOL
    )
