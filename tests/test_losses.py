"""KLQ loss, PPO losses and helpers against NumPy / PyTorch references of the paper and of TRL."""
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import klq_jax.losses as L
from klq_jax.losses import (
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    klq_loss,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    ppo_loss,
    ppo_policy_loss,
    ppo_value_loss,
    token_logprobs,
)

TOL = dict(rtol=1e-6, atol=1e-6)


def make_batch(seed, B=5, T=7):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, T + 1, size=B)
    lengths[0] = T
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    f = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    logp = (-rng.uniform(0.1, 3.0, size=(B, T))).astype(np.float32)
    ref_logp = (logp + 0.3 * f(B, T)).astype(np.float32)
    return dict(
        logp=logp,
        ref_logp=ref_logp,
        old_logp=(logp + 0.2 * f(B, T)).astype(np.float32),
        values=f(B, T),
        old_values=f(B, T),
        targets=f(B, T),
        advantages=f(B, T),
        returns=f(B, T),
        mask=mask,
    )


# ------------------------------------------------------------------------------- helpers ---


def test_token_logprobs_and_entropy_match_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(3, 5))
    for temp in (1.0, 0.7):
        got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=temp))
        tl = torch.from_numpy(logits) / temp
        want = torch.log_softmax(tl, -1).gather(-1, torch.from_numpy(tokens)[..., None])[..., 0]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
        ent = np.asarray(entropy_from_logits(jnp.asarray(logits), temperature=temp))
        want_ent = torch.distributions.Categorical(logits=tl).entropy().numpy()
        np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
    # bf16 logits: float32 out, close to the f32 computation on the rounded logits
    lb = jnp.asarray(logits, jnp.bfloat16)
    out = token_logprobs(lb, jnp.asarray(tokens))
    assert out.dtype == jnp.float32 and entropy_from_logits(lb).dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(out), np.asarray(token_logprobs(jnp.asarray(lb, jnp.float32), jnp.asarray(tokens))), **TOL
    )
    with pytest.raises(ValueError, match="trailing vocabulary axis"):
        token_logprobs(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))


def test_token_logprobs_gradient_is_onehot_minus_softmax():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, 6, size=(2, 3)))
    g = jax.grad(lambda z: token_logprobs(z, tokens).sum())(logits)
    want = jax.nn.one_hot(tokens, 6) - jax.nn.softmax(logits, -1)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), **TOL)


def test_token_logprobs_of_ids_outside_the_vocabulary_are_nan_not_wrapped_or_clipped():
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    tokens = jnp.asarray([[0, 5, 6], [-1, -100, 2]])  # 6 = V and negative ids are out of range
    lp = np.asarray(token_logprobs(logits, tokens))
    bad = np.array([[False, False, True], [True, True, False]])
    assert np.isnan(lp[bad]).all() and np.isfinite(lp[~bad]).all()
    want = np.asarray(jax.nn.log_softmax(logits, -1))
    np.testing.assert_allclose(lp[0, :2], [want[0, 0, 0], want[0, 1, 5]], **TOL)  # in range: as before
    # Masked out with jnp.where after the call, they leave the value and the gradient finite.
    f = lambda z: jnp.where(jnp.asarray(bad), 0.0, token_logprobs(z, tokens)).sum()
    assert np.isfinite(float(f(logits))) and np.isfinite(np.asarray(jax.grad(f)(logits))).all()


def test_kl_estimators():
    rng = np.random.default_rng(2)
    lp = rng.normal(size=(4, 6)).astype(np.float32)
    ref = rng.normal(size=(4, 6)).astype(np.float32)
    d = lp.astype(np.float64) - ref
    np.testing.assert_allclose(np.asarray(kl_estimate(lp, ref, "k1")), d, **TOL)
    np.testing.assert_allclose(np.asarray(kl_estimate(lp, ref, "k2")), 0.5 * d**2, rtol=1e-5, atol=1e-6)
    k3 = np.asarray(kl_estimate(lp, ref, "k3"))
    np.testing.assert_allclose(k3, np.exp(-d) + d - 1, rtol=1e-5, atol=1e-6)
    assert np.all(k3 >= 0)
    # exact expectations under π: E[k1] = E[k3] = KL(π||π_ref) on a small categorical
    p = np.array([0.5, 0.3, 0.2])
    q = np.array([0.2, 0.2, 0.6])
    kl = float(np.sum(p * np.log(p / q)))
    for kind in ("k1", "k3"):
        est = np.asarray(kl_estimate(jnp.log(p), jnp.log(q), kind))
        np.testing.assert_allclose(float(np.sum(p * est)), kl, rtol=1e-5)
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(lp, ref, "k4")


def test_masked_reductions_match_numpy_and_trl():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    m = (rng.uniform(size=(4, 6)) > 0.4).astype(np.float32)
    m[0, 0] = 1.0
    xs = x.astype(np.float64)
    real = xs[m > 0]
    np.testing.assert_allclose(float(masked_sum(x, m)), real.sum(), **TOL)
    np.testing.assert_allclose(float(masked_mean(x, m)), real.mean(), **TOL)
    rows = [xs[i][m[i] > 0].mean() if m[i].sum() else 0.0 for i in range(4)]
    np.testing.assert_allclose(np.asarray(masked_mean(x, m, axis=1)), rows, **TOL)
    np.testing.assert_allclose(float(masked_var(x, m)), real.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(float(masked_var(x, m, unbiased=False)), real.var(), rtol=1e-5)
    w = np.asarray(masked_whiten(x, m))
    want = np.where(m > 0, (xs - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), 0.0)
    np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-5)
    w2 = np.asarray(masked_whiten(x, m, shift_mean=False))
    np.testing.assert_allclose(w2, np.where(m > 0, want + real.mean(), 0.0), rtol=1e-5, atol=1e-5)
    # empty / single-entry masks: zeros, never NaN
    z = jnp.zeros_like(m)
    for v in (masked_mean(x, z), masked_var(x, z), masked_sum(x, z)):
        assert float(v) == 0.0
    assert np.all(np.asarray(masked_whiten(x, z)) == 0.0)
    one = np.zeros_like(m)
    one[1, 2] = 1
    assert float(masked_var(x, one)) == 0.0
    g = jax.grad(lambda a: masked_mean(a, z))(jnp.asarray(x))
    assert np.all(np.asarray(g) == 0.0)
    ev = float(explained_variance(xs + 0.1 * rng.normal(size=xs.shape), x, m))
    assert 0.9 < ev <= 1.0



def test_masked_statistics_ignore_nan_padding_in_value_and_gradient():
    # a NaN (or inf) in a padded slot reaches neither the value nor the gradient of any entry
    x = jnp.array([1.0, 2.0, 4.0, jnp.nan])
    y = jnp.array([0.5, 2.5, 3.0, jnp.inf])
    m = jnp.array([1.0, 1.0, 1.0, 0.0])
    clean_x, clean_y = x.at[3].set(0.0), y.at[3].set(0.0)
    real = np.array([1.0, 2.0, 4.0])
    fns = {
        "masked_var": lambda a, b: masked_var(a, m),
        "masked_whiten": lambda a, b: masked_whiten(a, m)[0],
        "explained_variance": lambda a, b: explained_variance(a, b, m),
    }
    for name, f in fns.items():
        g_dirty = np.asarray(jax.grad(f, argnums=(0, 1))(x, y))
        g_clean = np.asarray(jax.grad(f, argnums=(0, 1))(clean_x, clean_y))
        assert np.all(np.isfinite(g_dirty)), name
        np.testing.assert_array_equal(g_dirty, g_clean, err_msg=name)
        assert np.all(g_dirty[:, 3] == 0.0), name
        assert float(f(x, y)) == float(f(clean_x, clean_y)), name
    # independent values (float64 NumPy over the real entries)
    np.testing.assert_allclose(float(masked_var(x, m)), real.var(ddof=1), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(masked_whiten(x, m)),
        np.append((real - real.mean()) / np.sqrt(real.var(ddof=1) + 1e-8), 0.0), rtol=1e-5)
    yr = np.array([0.5, 2.5, 3.0])
    np.testing.assert_allclose(float(explained_variance(x, y, m)), 1 - (yr - real).var() / yr.var(), rtol=1e-5)
    # d var / dx_i = 2 (x_i - mean) / (n - 1) on the real entries
    np.testing.assert_allclose(np.asarray(jax.grad(lambda a: masked_var(a, m))(x))[:3],
                               2 * (real - real.mean()) / 2, rtol=1e-6)


def test_entropy_with_minus_inf_logits_is_over_the_finite_entries():
    logits = np.array([[[2.0, -np.inf, 0.5, -1.0, -np.inf]], [[0.0, 1.0, -np.inf, -np.inf, 3.0]]], np.float32)
    for temp in (1.0, 0.7):
        got = np.asarray(entropy_from_logits(jnp.asarray(logits), temperature=temp))
        want = np.zeros(got.shape)
        for b in range(2):
            z = logits[b, 0][np.isfinite(logits[b, 0])].astype(np.float64) / temp
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            want[b, 0] = -(p * np.log(p)).sum()
        np.testing.assert_allclose(got, want, rtol=1e-5)
    g = np.asarray(jax.grad(lambda z: entropy_from_logits(z).sum())(jnp.asarray(logits)))
    assert np.all(np.isfinite(g)) and np.all(g[~np.isfinite(logits)] == 0.0)
    # dH/dz_v = -p_v (z_v - Σ p z) on the finite entries (autodiff of the finite sub-vector agrees)
    finite = jnp.asarray(logits[0, 0, [0, 2, 3]])
    np.testing.assert_allclose(g[0, 0, [0, 2, 3]], np.asarray(jax.grad(lambda z: entropy_from_logits(z))(finite)),
                               rtol=1e-6, atol=1e-7)
    # finite logits: unchanged maths (bit for bit against the plain formula)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 6)).astype(np.float32))
    plain = jax.nn.logsumexp(z, -1) - jnp.sum(jax.nn.softmax(z, -1) * z, -1)
    np.testing.assert_array_equal(np.asarray(entropy_from_logits(z)), np.asarray(plain))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_concrete_bad_temperature_is_refused_in_one_line(temperature):
    logits, tokens = jnp.zeros((1, 2, 4)), jnp.array([[0, 3]])
    for call in (lambda: token_logprobs(logits, tokens, temperature=temperature),
                 lambda: entropy_from_logits(logits, temperature=temperature)):
        with pytest.raises(ValueError, match=r"temperature=.* must be a finite number > 0") as e:
            call()
        assert "\n" not in str(e.value)
    # a traced temperature is not checked (and still works)
    got = jax.jit(lambda t: token_logprobs(logits, tokens, temperature=t))(0.5)
    np.testing.assert_allclose(np.asarray(got), np.log(0.25), rtol=1e-6)


def test_mask_shape_errors_name_the_function_called():
    x, bad = jnp.zeros((2, 3)), jnp.ones((2, 2))
    for name, call in (("masked_mean", lambda: masked_mean(x, bad)),
                       ("masked_var", lambda: masked_var(x, bad)),
                       ("masked_whiten", lambda: masked_whiten(x, bad)),
                       ("explained_variance", lambda: explained_variance(x, x, bad)),
                       ("klq_loss", lambda: klq_loss(x, x, x, x, x + 1, tau=0.1, entropy=bad)),
                       ("ppo_loss", lambda: ppo_loss(x, x, x, x, x, x, x + 1, entropy=bad))):
        with pytest.raises(ValueError, match=f"^{name}: .*same shape") as e:
            call()
        assert "\n" not in str(e.value)

# ------------------------------------------------------------------------------------ KLQ ---


def test_klq_loss_value_metrics_and_analytic_gradient():
    d = make_batch(seed=10)
    tau = 0.3
    args = [jnp.asarray(d[k]) for k in ("logp", "ref_logp", "values", "targets", "mask")]
    loss, metrics = klq_loss(*args, tau=tau)
    m = d["mask"].astype(np.float64)
    n = m.sum()
    q = tau * (d["logp"].astype(np.float64) - d["ref_logp"]) + d["values"]
    err = q - d["targets"]
    np.testing.assert_allclose(float(loss), float((m * err**2).sum() / n), rtol=1e-6)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(metrics["q_mean"]), (m * q).sum() / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["target_mean"]), (m * d["targets"]).sum() / n, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["td_abs_mean"]), (m * np.abs(err)).sum() / n, rtol=1e-5)
    G = d["targets"][m > 0].astype(np.float64)
    ev = 1 - np.var(G - q[m > 0]) / np.var(G)
    np.testing.assert_allclose(float(metrics["explained_variance"]), ev, rtol=1e-4, atol=1e-5)
    assert float(metrics["num_tokens"]) == n
    assert all(v.shape == () and v.dtype == jnp.float32 for v in metrics.values())

    # d/dlogp = 2τ m (Q − G)/N, d/dV = 2 m (Q − G)/N, d/dG = 0 (stop_gradient on the targets)
    f = lambda lp, v, G: klq_loss(lp, args[1], v, G, args[4], tau=tau)[0]  # noqa: E731
    g_lp, g_v, g_G = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(args[0], args[2], args[3])
    np.testing.assert_allclose(np.asarray(g_lp), 2 * tau * m * err / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_v), 2 * m * err / n, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(g_G), 0.0)
    # Q depends on log π_b with the opposite sign (the caller keeps π_b fixed)
    g_ref = jax.grad(lambda r: klq_loss(args[0], r, args[2], args[3], args[4], tau=tau)[0])(args[1])
    np.testing.assert_allclose(np.asarray(g_ref), -2 * tau * m * err / n, rtol=1e-5, atol=1e-7)


def test_klq_loss_at_reference_policy_is_value_regression():
    d = make_batch(seed=11)
    lp, v, G, m = (jnp.asarray(d[k]) for k in ("logp", "values", "targets", "mask"))
    loss, metrics = klq_loss(lp, lp, v, G, m, tau=0.05)
    mm = d["mask"].astype(np.float64)
    want = (mm * (d["values"].astype(np.float64) - d["targets"]) ** 2).sum() / mm.sum()
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    vr, _ = ppo_value_loss(v, v, G, m, clip=None, half=False)
    np.testing.assert_allclose(float(loss), float(vr), rtol=1e-6)
    assert float(metrics["logratio_mean"]) == 0.0 and float(metrics["kl_k3_mean"]) == 0.0
    # and then the gradient w.r.t. log π is τ times the one w.r.t. V
    g = jax.grad(lambda a, b: klq_loss(a, lp, b, G, m, tau=0.05)[0], argnums=(0, 1))(lp, v)
    np.testing.assert_allclose(np.asarray(g[0]), 0.05 * np.asarray(g[1]), rtol=1e-6, atol=1e-9)


def test_klq_loss_through_logits_end_to_end():
    """Gradient w.r.t. logits = dL/dlogp · (onehot − softmax), by the chain rule."""
    rng = np.random.default_rng(12)
    B, T, V = 2, 4, 5
    logits = jnp.asarray(rng.normal(size=(B, T, V)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, V, size=(B, T)))
    ref = jnp.asarray(-rng.uniform(1, 2, size=(B, T)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    G = jnp.asarray(rng.normal(size=(B, T)), jnp.float32)
    m = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]], jnp.float32)
    tau = 0.5
    g = jax.grad(lambda z: klq_loss(token_logprobs(z, tokens), ref, v, G, m, tau=tau)[0])(logits)
    lp = token_logprobs(logits, tokens)
    dl = 2 * tau * m * (tau * (lp - ref) + v - G) / m.sum()
    want = dl[..., None] * (jax.nn.one_hot(tokens, V) - jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_losses_ignore_nonfinite_padding():
    d = make_batch(seed=13)
    pad = d["mask"] == 0
    assert pad.any()
    dirty = {k: np.where(pad, -np.inf, v).astype(np.float32) if k != "mask" else v for k, v in d.items()}
    for k in ("values", "targets", "advantages", "returns", "old_values"):
        dirty[k] = np.where(pad, np.nan, d[k]).astype(np.float32)
    clean = {k: np.where(pad, 0.0, v).astype(np.float32) for k, v in d.items()}

    def both(x):
        fk = lambda lp, v: klq_loss(lp, x["ref_logp"], v, x["targets"], x["mask"], tau=0.1)[0]  # noqa: E731
        fp = lambda lp, v: ppo_loss(  # noqa: E731
            lp, x["old_logp"], v, x["old_values"], x["advantages"], x["returns"], x["mask"]
        )[0]
        return [(f(x["logp"], x["values"]), jax.grad(f, argnums=(0, 1))(x["logp"], x["values"])) for f in (fk, fp)]

    for (l1, g1), (l2, g2) in zip(both(dirty), both(clean)):
        np.testing.assert_allclose(float(l1), float(l2), **TOL)
        for a, b in zip(g1, g2):
            assert np.all(np.isfinite(np.asarray(a)))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), **TOL)
    # a minibatch of padding only: loss 0, finite
    z = jnp.zeros((2, 3))
    assert float(klq_loss(z, z, z, z, z, tau=0.1)[0]) == 0.0
    assert float(ppo_loss(z, z, z, z, z, z, z)[0]) == 0.0


def test_klq_loss_vmap_jit_bf16():
    d = make_batch(seed=14)
    keys = ("logp", "ref_logp", "values", "targets", "mask")
    args = [jnp.asarray(d[k]) for k in keys]
    f = jax.jit(lambda *a: klq_loss(*a, tau=0.2))
    loss, _ = f(*args)
    # vmap over a leading axis of minibatches = the loss of each minibatch
    stacked = [jnp.stack([a, a[::-1]]) for a in args]
    vl, vm = jax.vmap(lambda *a: klq_loss(*a, tau=0.2))(*stacked)
    assert vl.shape == (2,) and vm["q_mean"].shape == (2,)
    np.testing.assert_allclose(np.asarray(vl), [float(loss)] * 2, rtol=1e-6)
    # bf16 inputs
    bf = [a.astype(jnp.bfloat16) for a in args]
    lb, mb = klq_loss(*bf, tau=0.2)
    assert lb.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in mb.values())
    rounded = [a.astype(jnp.float32) for a in bf]
    np.testing.assert_allclose(float(lb), float(klq_loss(*rounded, tau=0.2)[0]), rtol=1e-6)
    np.testing.assert_allclose(float(lb), float(loss), rtol=2e-2)
    g = jax.grad(lambda v: klq_loss(bf[0], bf[1], v, bf[3], bf[4], tau=0.2)[0])(bf[2])
    assert g.dtype == jnp.bfloat16  # gradient has the dtype of the differentiated input


# ------------------------------------------------------------------------------------ PPO ---


def _trl_reference(d, clip_eps, value_clip, vf_coef):
    """TRL PPOTrainer's loss block (v0.12, L479-510), in torch, one mask for both terms."""
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=k in ("logp", "values")) for k, v in d.items()}
    mask = t["mask"].bool()

    def masked_mean(x, m):
        return (x * m).sum() / m.sum()

    vpred = t["values"]
    vpredclipped = torch.clamp(vpred, t["old_values"] - value_clip, t["old_values"] + value_clip)
    vf1 = torch.square(vpred - t["returns"])
    vf2 = torch.square(vpredclipped - t["returns"])
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    vf_clipfrac = masked_mean((vf2 > vf1).double(), mask)
    # TRL fills padded log-probs with INVALID_LOGPROB = 1.0 in both arrays
    new_lp = torch.where(mask, t["logp"], torch.ones_like(t["logp"]))
    old_lp = torch.where(mask, t["old_logp"], torch.ones_like(t["logp"]))
    diff = new_lp - old_lp
    ratio = torch.exp(diff)
    pg1 = -t["advantages"] * ratio
    pg2 = -t["advantages"] * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    loss = pg_loss + vf_coef * vf_loss
    loss.backward()
    return dict(
        loss=loss.item(),
        pg_loss=pg_loss.item(),
        vf_loss=vf_loss.item(),
        vf_clipfrac=vf_clipfrac.item(),
        clipfrac=masked_mean((pg2 > pg1).double(), mask).item(),
        approxkl_unmasked=(0.5 * (diff**2).mean()).item(),
        ratio=ratio[mask].detach().numpy(),
        g_logp=t["logp"].grad.numpy(),
        g_values=t["values"].grad.numpy(),
    )


@pytest.mark.parametrize("clip_eps,value_clip,vf_coef", [(0.2, 0.2, 0.1), (0.1, 0.05, 0.5)])
def test_ppo_loss_matches_trl(clip_eps, value_clip, vf_coef):
    d = make_batch(seed=20)
    ref = _trl_reference(d, clip_eps, value_clip, vf_coef)
    keys = ("logp", "old_logp", "values", "old_values", "advantages", "returns", "mask")
    args = [jnp.asarray(d[k]) for k in keys]

    def f(lp, v):
        a = list(args)
        a[0], a[2] = lp, v
        return ppo_loss(*a, clip_eps=clip_eps, value_clip=value_clip, vf_coef=vf_coef)

    (loss, metrics), (g_lp, g_v) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(args[0], args[2])
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["pg_loss"]), ref["pg_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["vf_loss"]), ref["vf_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["clipfrac"]), ref["clipfrac"], **TOL)
    np.testing.assert_allclose(float(metrics["vf_clipfrac"]), ref["vf_clipfrac"], **TOL)
    assert 0 < ref["clipfrac"] < 1 and 0 < ref["vf_clipfrac"] < 1  # both branches exercised
    n_real, n_all = d["mask"].sum(), d["mask"].size
    np.testing.assert_allclose(float(metrics["approx_kl"]) * n_real / n_all, ref["approxkl_unmasked"], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_mean"]), ref["ratio"].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ratio_var"]), ref["ratio"].var(ddof=1), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_lp), ref["g_logp"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g_v), ref["g_values"], rtol=1e-5, atol=1e-7)
    # advantages and returns carry no gradient
    ga, gr = jax.grad(lambda A, Rt: ppo_loss(args[0], args[1], args[2], args[3], A, Rt, args[6])[0], argnums=(0, 1))(
        args[4], args[5]
    )
    assert np.all(np.asarray(ga) == 0) and np.all(np.asarray(gr) == 0)


def test_ppo_value_loss_options():
    d = make_batch(seed=21)
    v, old, Rt, m = (jnp.asarray(d[k]) for k in ("values", "old_values", "returns", "mask"))
    mm = d["mask"].astype(np.float64)
    e1 = (d["values"].astype(np.float64) - d["returns"]) ** 2
    # Algorithm 1: no ½, and no clipping
    full, _ = ppo_value_loss(v, old, Rt, m, clip=None, half=False)
    np.testing.assert_allclose(float(full), (mm * e1).sum() / mm.sum(), rtol=1e-6)
    half_unclipped, _ = ppo_value_loss(v, old, Rt, m, clip=None)
    np.testing.assert_allclose(float(half_unclipped), 0.5 * float(full), rtol=1e-6)
    clipped, met = ppo_value_loss(v, old, Rt, m, clip=0.2, half=False)
    assert float(clipped) >= float(full) - 1e-6  # max(·,·) can only add
    np.testing.assert_allclose(float(met["value_error"]), (mm * e1).sum() / mm.sum(), rtol=1e-6)
    # at V = V_old the clipped and unclipped losses coincide
    a, _ = ppo_value_loss(old, old, Rt, m, clip=0.2)
    b, _ = ppo_value_loss(old, old, Rt, m, clip=None)
    np.testing.assert_allclose(float(a), float(b), **TOL)


def test_ppo_policy_loss_at_old_policy_is_minus_mean_advantage():
    d = make_batch(seed=22)
    lp, A, m = (jnp.asarray(d[k]) for k in ("logp", "advantages", "mask"))
    loss, met = ppo_policy_loss(lp, lp, A, m)
    mm = d["mask"].astype(np.float64)
    np.testing.assert_allclose(float(loss), -(mm * d["advantages"]).sum() / mm.sum(), rtol=1e-6, atol=1e-7)
    assert float(met["clipfrac"]) == 0.0 and float(met["approx_kl"]) == 0.0
    np.testing.assert_allclose(float(met["ratio_mean"]), 1.0, **TOL)
    # policy gradient at ρ = 1: −A m / N
    g = jax.grad(lambda x: ppo_policy_loss(x, lp, A, m)[0])(lp)
    np.testing.assert_allclose(np.asarray(g), -mm * d["advantages"] / mm.sum(), rtol=1e-5, atol=1e-7)
    # bf16 inputs: float32 out
    bl, bm = ppo_policy_loss(lp.astype(jnp.bfloat16), lp.astype(jnp.bfloat16), A.astype(jnp.bfloat16), m)
    assert bl.dtype == jnp.float32 and bm["ratio_var"].dtype == jnp.float32
    np.testing.assert_allclose(float(bl), float(loss), rtol=2e-2, atol=1e-3)


def test_ppo_loss_entropy_metric_and_shape_error():
    d = make_batch(seed=23)
    keys = ("logp", "old_logp", "values", "old_values", "advantages", "returns", "mask")
    args = [jnp.asarray(d[k]) for k in keys]
    ent = jnp.asarray(np.abs(d["values"]))
    _, met = ppo_loss(*args, entropy=ent)
    mm = d["mask"]
    np.testing.assert_allclose(float(met["entropy_mean"]), (mm * np.abs(d["values"])).sum() / mm.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        klq_loss(args[0], args[1], args[2][:, :-1], args[4], args[6], tau=0.1)


def test_docstring_examples_run():
    result = doctest.testmod(L, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 20
    assert result.failed == 0
    for name in L.__all__:
        doc = getattr(L, name).__doc__
        assert doc and ">>>" in doc, f"{name} needs a runnable example"
    for name in ("klq_loss", "ppo_policy_loss", "ppo_value_loss", "ppo_loss"):
        doc = getattr(L, name).__doc__
        assert "Eq. (" in doc or "Algorithm 1" in doc, name
