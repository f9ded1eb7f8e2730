"""GPT-2 reward model: HF GPT2ForSequenceClassification -> Flax, score parity on padded batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from klq_jax.models import gpt2, hf
from klq_jax.models.hf import ConversionError

import torch  # test-time reference (the .[test] extra)
import transformers

HF_TINY = dict(vocab_size=97, n_positions=40, n_embd=24, n_layer=2, n_head=3, n_inner=40,
               activation_function="gelu_new", layer_norm_epsilon=1e-5, num_labels=1)


def _randomise(model, seed):
    # HF's init (std 0.02, zero biases, unit LayerNorms) would hide a wrong transpose or a dropped bias.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.2 * noise)


@pytest.fixture(scope="module")
def hf_rm(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2-rm")
    torch.manual_seed(0)
    model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**HF_TINY))
    _randomise(model, 0)
    model.eval()
    model.save_pretrained(d)
    return model, d


def _hf_scores(model, tokens, mask):
    """HF's score at each row's last real token, positions from the mask (our convention).

    Runs HF's own trunk and score head on every position and gathers at the last real token in
    numpy (HF would need a pad id to find it; this RM's tokenizer has none).
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        h = model.transformer(
            input_ids=torch.as_tensor(tokens, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            position_ids=torch.as_tensor(pos, dtype=torch.long),
        ).last_hidden_state
        per_token = model.score(h)[..., 0].numpy()
    last = np.array([np.nonzero(m)[0].max() for m in mask])
    return per_token[np.arange(len(tokens)), last]


def test_config_from_hf(hf_rm):
    _, d = hf_rm
    cfg = hf.config_from_hf(json.loads((d / "config.json").read_text()))
    assert (cfg.vocab_size, cfg.n_positions, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.inner_size) == (
        97, 40, 24, 2, 3, 40)
    assert cfg.score_head and not cfg.lm_head


def test_score_parity_padded_batch(hf_rm):
    model, d = hf_rm
    cfg, graphdef, params = hf.load_hf(d, strict=True)
    rng = np.random.default_rng(1)
    B, T = 5, 12
    tokens = rng.integers(0, 97, (B, T)).astype(np.int32)
    # right-, left-, both-side padded rows and a full row; pad slots hold random ids (no pad token).
    mask = np.zeros((B, T), np.int32)
    for b, (lo, hi) in enumerate([(0, 12), (0, 7), (4, 12), (2, 9), (0, 1)]):
        mask[b, lo:hi] = 1
    ours = np.asarray(gpt2.score(graphdef, params, tokens, mask))
    ref = _hf_scores(model, tokens, mask)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert np.std(ref) > 1e-2  # the scores differ between rows: the comparison means something

    # Each padded row scores as its unpadded sequence through HF's own classifier (batch of 1,
    # where HF reads the last position without needing a pad id).
    for b in range(B):
        real = tokens[b][mask[b] > 0]
        with torch.no_grad():
            logit = model(input_ids=torch.as_tensor(real[None], dtype=torch.long)).logits[0, 0].item()
        assert abs(ours[b] - logit) <= 1e-4


def test_hf_pad_token_readout_agrees(hf_rm):
    """With a pad id that occurs nowhere else, HF's own last-non-pad read-out gives our scores."""
    model, d = hf_rm
    _, graphdef, params = hf.load_hf(d)
    rng = np.random.default_rng(2)
    B, T, PAD = 3, 10, 96
    tokens = rng.integers(0, 96, (B, T)).astype(np.int32)
    mask = (np.arange(T)[None] < np.array([[10], [6], [3]])).astype(np.int32)
    tokens = np.where(mask > 0, tokens, PAD)
    model.config.pad_token_id = PAD
    try:
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
    finally:
        model.config.pad_token_id = None
    ours = np.asarray(gpt2.score(graphdef, params, tokens, mask))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_head_parity(tmp_path, tied):
    # Untied: HF's lm_head.weight is its own tensor (not wte); it must be read, not skipped as "tied".
    cfg_hf = dict(HF_TINY, tie_word_embeddings=tied)
    cfg_hf.pop("num_labels")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg_hf))
    _randomise(model, 3)
    model.eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"]) == tied
    model.save_pretrained(tmp_path / "hf")
    cfg, graphdef, params = hf.load_hf(tmp_path / "hf", strict=True)
    assert cfg.lm_head and not cfg.score_head and cfg.tie_word_embeddings == tied
    tokens = np.random.default_rng(0).integers(0, 97, (2, 9))
    mask = np.ones_like(tokens)
    ours = np.asarray(gpt2.apply(graphdef, params, tokens, mask).logits)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    # ... and back: transformers loads our export with the same tensors.
    hf.save_hf(tmp_path / "back", cfg, params)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "back")
    assert back.config.tie_word_embeddings == tied
    for k, v in back.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_bfloat16_compute_is_close(hf_rm):
    model, d = hf_rm
    _, g32, p32 = hf.load_hf(d)
    _, g16, p16 = hf.load_hf(d, dtype="float32", param_dtype="bfloat16")
    tokens = np.random.default_rng(0).integers(0, 97, (2, 8))
    mask = np.ones_like(tokens)
    s32 = np.asarray(gpt2.score(g32, p32, tokens, mask))
    s16 = np.asarray(gpt2.score(g16, p16, tokens, mask))
    assert s16.dtype == np.float32
    np.testing.assert_allclose(s16, s32, atol=0.1 * (1 + np.abs(s32).max()))


def test_errors(hf_rm, tmp_path):
    _, d = hf_rm
    cfg = json.loads((d / "config.json").read_text())
    with pytest.raises(ConversionError, match="num_labels=2"):
        hf.config_from_hf(dict(cfg, id2label={"0": "a", "1": "b"}))
    with pytest.raises(ConversionError, match=r"architecture \['GPTNeoXForCausalLM'\] is not supported; supported architectures: GPT2Model"):
        hf.config_from_hf(dict(cfg, architectures=["GPTNeoXForCausalLM"]))
    # weights that do not match config.json name the tensor
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, n_embd=48)))
    import shutil

    shutil.copy(d / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ConversionError, match=r"has shape \(24,?.*expected.*n_embd=48"):
        hf.load_hf(tmp_path)
    g, p = gpt2.init(gpt2.GPT2Config.tiny(), jax.random.key(0))
    with pytest.raises(ValueError, match="n_positions"):
        gpt2.score(g, p, jnp.zeros((1, 33), jnp.int32), jnp.ones((1, 33)))


def test_param_axes_cover_every_dim():
    _, params = gpt2.abstract_params(gpt2.GPT2Config.tiny())
    from flax import nnx

    for path, var in nnx.to_flat_state(params):
        axes = var.get_metadata().get("axes")
        assert axes is not None and len(axes) == len(var.shape), path
