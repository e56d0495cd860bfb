"""VA-VAE losses: VF parity with the reference fixture, KL / nll / GAN losses against torch
formulas, and the adaptive weights by an independent route (a torch autograd twin)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vavae_jax import losses

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def _t(x):  # NHWC numpy -> NCHW torch
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2).copy())


def _close(a, b, rtol=1e-5, atol=1e-7):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------------------------
# VF loss
# ---------------------------------------------------------------------------------------------
def test_vf_loss_matches_reference_fixture(fixtures_dir):
    fx = np.load(fixtures_dir / "vf_loss.npz")
    z, aux = _nhwc(fx["z_proj"]), _nhwc(fx["aux_feature"])  # [3, 4, 4, 24]
    vf, terms = losses.vf_loss(z, aux, distmat_margin=0.25, cos_margin=0.5)
    _close(terms["vf_distmat"], fx["distmat_loss"])
    _close(terms["vf_cos"], fx["cos_loss"])
    _close(vf, fx["distmat_loss"] + fx["cos_loss"])
    vf_w, _ = losses.vf_loss(z, aux, 0.25, 0.5, distmat_weight=2.0, cos_weight=0.5)
    _close(vf_w, 2.0 * fx["distmat_loss"] + 0.5 * fx["cos_loss"])


def _torch_vf(z, aux, m_d, m_c):
    """The reference's VF lines (contperceptual.py), NCHW."""
    zf, af = z.flatten(2), aux.flatten(2)
    zn, an = F.normalize(zf, dim=1), F.normalize(af, dim=1)
    diff = torch.abs(torch.einsum("bci,bcj->bij", zn, zn) - torch.einsum("bci,bcj->bij", an, an))
    return F.relu(diff - m_d).mean(), F.relu(1 - m_c - F.cosine_similarity(aux, z)).mean()


def test_vf_loss_eps_semantics_and_gradient():
    # Tokens with tiny or zero norm exercise normalize's 1e-12 and cosine_similarity's 1e-8 floors.
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    aux = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
    z[0, 0, 0] = 0.0
    z[0, 0, 1] *= 1e-9
    aux[1, 2, 2] *= 1e-10
    zt, at = _t(z).requires_grad_(True), _t(aux)
    d_ref, c_ref = _torch_vf(zt, at, 0.1, 0.2)
    vf, terms = losses.vf_loss(z, aux, 0.1, 0.2)
    _close(terms["vf_distmat"], d_ref.item())
    _close(terms["vf_cos"], c_ref.item())
    # Gradients agree away from the clamped tokens (there torch's in-place clamp differs).
    (d_ref + c_ref).backward()
    g = jax.jit(jax.grad(lambda zz: losses.vf_loss(zz, aux, 0.1, 0.2)[0]))(jnp.asarray(z))
    g_ref = _nhwc(zt.grad.numpy())
    mask = np.ones(z.shape[:3], bool)
    mask[0, 0, :2] = False
    _close(np.asarray(g)[mask], g_ref[mask], rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# KL, nll, GAN losses
# ---------------------------------------------------------------------------------------------
def test_kl_and_nll_match_torch_formulas():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    xr = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    mean = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    logvar = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    p = rng.uniform(0, 1, (2, 1, 1, 1)).astype(np.float32)
    lv = np.float32(0.3)

    m_t, lv_t = _t(mean), _t(logvar)
    kl_ref = 0.5 * torch.sum(m_t**2 + torch.exp(lv_t) - 1.0 - lv_t, dim=[1, 2, 3])
    _close(losses.kl_loss(mean, logvar), (torch.sum(kl_ref) / 2).item())

    rec = torch.abs(_t(x) - _t(xr)) + 0.7 * _t(p)
    nll = rec / torch.exp(torch.tensor(lv)) + lv
    got = losses.nll_loss(x, xr, lv, p, 0.7)
    _close(got[0], (torch.sum(nll) / 2).item())
    _close(got[1], (torch.sum(nll) / 2).item())
    _close(got[2], rec.mean().item())
    # Weights scale only the weighted term; perceptual_weight 0 ignores p_loss (reference).
    _close(losses.nll_loss(x, xr, lv, p, 0.7, weights=2.0)[1], (torch.sum(nll)).item())
    rec0 = torch.abs(_t(x) - _t(xr))
    _close(losses.nll_loss(x, xr, lv, None, 0.0)[2], rec0.mean().item())


def test_hinge_and_vanilla_match_torch_formulas():
    rng = np.random.default_rng(2)
    real = (3 * rng.normal(size=(2, 6, 6, 1))).astype(np.float32)
    fake = (3 * rng.normal(size=(2, 6, 6, 1))).astype(np.float32)
    real[0, 0, 0, 0], fake[0, 0, 0, 0] = 30.0, -30.0  # softplus' linear regime
    r, f = torch.tensor(real), torch.tensor(fake)
    hinge = 0.5 * (torch.mean(F.relu(1.0 - r)) + torch.mean(F.relu(1.0 + f)))
    vanilla = 0.5 * (torch.mean(F.softplus(-r)) + torch.mean(F.softplus(f)))
    _close(losses.hinge_d_loss(real, fake), hinge.item())
    _close(losses.vanilla_d_loss(real, fake), vanilla.item())

    cfg = losses.LossConfig(disc_start=10, disc_factor=0.5, disc_loss="vanilla")
    loss, terms = losses.discriminator_loss(real, fake, 10, cfg)
    _close(loss, 0.5 * vanilla.item())
    _close(terms["logits_real"], real.mean())
    assert float(losses.discriminator_loss(real, fake, 9, cfg)[0]) == 0.0


def test_adopt_weight_python_and_traced():
    assert losses.adopt_weight(1.0, 4, 5) == 0.0
    assert losses.adopt_weight(1.0, 5, 5) == 1.0
    assert losses.adopt_weight(1.0, 4, 5, value=0.25) == 0.25
    f = jax.jit(lambda s, t: losses.adopt_weight(0.5, s, t))
    assert float(f(4, 5)) == 0.0 and float(f(5, 5)) == 0.5 and float(f(6, 5)) == 0.5


# ---------------------------------------------------------------------------------------------
# Adaptive weights and the generator loss: JAX vs a torch autograd twin
# ---------------------------------------------------------------------------------------------
def _conv_nhwc(x, w, stride=1):  # w: HWIO
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_torch(x, w, stride=1):  # x NCHW, w HWIO numpy/torch -> OIHW
    return F.conv2d(x, w.permute(3, 2, 0, 1), stride=stride, padding=1)


def _tiny_problem():
    """A 2-conv 'encoder' (last kernel: enc), a 2-conv 'decoder' (last kernel: dec), a 1x1 VF
    projection, a 1-conv discriminator and a stand-in perceptual term (3x3 convs, padding 1)."""
    rng = np.random.default_rng(3)

    def w(*shape, s=0.3):
        return (s * rng.normal(size=shape)).astype(np.float32)

    params = dict(enc0=w(3, 3, 3, 8), enc=w(3, 3, 8, 8), dec0=w(3, 3, 4, 8), dec=w(3, 3, 8, 3))
    fixed = dict(proj=w(4, 6), disc=w(3, 3, 3, 1), logvar=np.float32(0.2))
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    aux = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
    eps = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
    return params, fixed, x, aux, eps


def _jax_pieces(params, fixed, x, aux, eps):
    h = jax.nn.silu(_conv_nhwc(x, params["enc0"], 2))
    moments = _conv_nhwc(h, params["enc"])
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, -30.0, 20.0)
    z = mean + jnp.exp(0.5 * logvar) * eps  # [2, 4, 4, 4]
    up = jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)
    xrec = _conv_nhwc(jax.nn.silu(_conv_nhwc(up, params["dec0"])), params["dec"])
    p_loss = jnp.mean(jnp.square(x - xrec), axis=(1, 2, 3), keepdims=True)  # [B, 1, 1, 1]
    logits_fake = _conv_nhwc(xrec, fixed["disc"])
    z_proj = jnp.einsum("bhwc,cd->bhwd", z, fixed["proj"])
    return dict(
        mean=mean, logvar=logvar, xrec=xrec, p_loss=p_loss, logits=logits_fake, z_proj=z_proj
    )


def _torch_reference(params, fixed, x, aux, eps, cfg, step):
    """The reference generator loss with both adaptive weights, through torch autograd."""
    P = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    xt, auxt, epst = _t(x), _t(aux), _t(eps)
    h = F.silu(F.conv2d(xt, P["enc0"].permute(3, 2, 0, 1), stride=2, padding=1))
    moments = _conv_torch(h, P["enc"])
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    z = mean + torch.exp(0.5 * logvar) * epst
    up = F.interpolate(z, scale_factor=2, mode="nearest")
    xrec = _conv_torch(F.silu(_conv_torch(up, P["dec0"])), P["dec"])
    p_loss = torch.mean((xt - xrec) ** 2, dim=[1, 2, 3], keepdim=True)
    lv = torch.tensor(fixed["logvar"])
    rec = torch.abs(xt - xrec) + cfg.perceptual_weight * p_loss
    nll = rec / torch.exp(lv) + lv
    nll_loss = torch.sum(nll) / nll.shape[0]
    kl = 0.5 * torch.sum(mean**2 + torch.exp(logvar) - 1.0 - logvar, dim=[1, 2, 3])
    kl_loss = torch.sum(kl) / kl.shape[0]
    g_loss = -torch.mean(_conv_torch(xrec, torch.tensor(fixed["disc"])))
    z_proj = torch.einsum("bchw,cd->bdhw", z, torch.tensor(fixed["proj"]))
    d_vf, c_vf = _torch_vf(z_proj, auxt, cfg.distmat_margin, cfg.cos_margin)
    vf = d_vf * cfg.distmat_weight + c_vf * cfg.cos_weight

    def ratio(a, b, last, max_value, scale):
        ga = torch.autograd.grad(a, last, retain_graph=True)[0]
        gb = torch.autograd.grad(b, last, retain_graph=True)[0]
        return (
            torch.clamp(torch.norm(ga) / (torch.norm(gb) + 1e-4), 0.0, max_value).detach() * scale
        )

    d_weight = ratio(nll_loss, g_loss, P["dec"], 1e4, cfg.disc_weight)
    vf_weight = ratio(nll_loss, vf, P["enc"], 1e8, cfg.vf_weight)
    disc_factor = cfg.disc_factor if step >= cfg.disc_start else 0.0
    total = nll_loss + cfg.kl_weight * kl_loss + d_weight * disc_factor * g_loss + vf_weight * vf
    grads = torch.autograd.grad(total, list(P.values()))
    return dict(
        total=total.item(),
        nll=nll_loss.item(),
        kl=kl_loss.item(),
        g=g_loss.item(),
        vf=vf.item(),
        d_weight=d_weight.item(),
        vf_weight=vf_weight.item(),
        grads={k: g.numpy() for k, g in zip(P, grads)},
    )


def _jax_total(params, fixed, x, aux, eps, cfg, step):
    """The same loss in JAX: weights from jax.grad of the partial losses, then generator_loss."""

    def partial(p):
        o = _jax_pieces(p, fixed, x, aux, eps)
        nll = losses.nll_loss(x, o["xrec"], fixed["logvar"], o["p_loss"], cfg.perceptual_weight)[0]
        g = -jnp.mean(o["logits"])
        vf = losses.vf_loss(o["z_proj"], aux, cfg.distmat_margin, cfg.cos_margin)[0]
        return nll, g, vf

    g_nll = jax.grad(lambda p: partial(p)[0])(params)
    g_g = jax.grad(lambda p: partial(p)[1])(params)
    g_vf = jax.grad(lambda p: partial(p)[2])(params)
    d_weight = losses.adaptive_weight(
        g_nll["dec"], g_g["dec"], losses.MAX_D_WEIGHT, cfg.disc_weight
    )
    vf_weight = losses.adaptive_weight(
        g_nll["enc"], g_vf["enc"], losses.MAX_VF_WEIGHT, cfg.vf_weight
    )
    o = _jax_pieces(params, fixed, x, aux, eps)
    return losses.generator_loss(
        x,
        o["xrec"],
        o["mean"],
        o["logvar"],
        fixed["logvar"],
        o["p_loss"],
        o["logits"],
        o["z_proj"],
        aux,
        d_weight,
        vf_weight,
        step,
        cfg,
    )


@functools.partial(jax.jit, static_argnums=(5,))  # one compilation for both steps (traced)
def _jax_total_and_grad(params, fixed, x, aux, eps, cfg, step):
    return jax.value_and_grad(lambda p: _jax_total(p, fixed, x, aux, eps, cfg, step), has_aux=True)(
        params
    )


@pytest.mark.parametrize("step", [3, 7])  # before and after disc_start
def test_adaptive_weights_and_generator_loss_match_torch_autograd(step):
    params, fixed, x, aux, eps = _tiny_problem()
    cfg = losses.LossConfig(disc_start=5, kl_weight=1e-2, distmat_margin=0.1, cos_margin=0.2)
    ref = _torch_reference(params, fixed, x, aux, eps, cfg, step)

    (total, terms), grads = _jax_total_and_grad(params, fixed, x, aux, eps, cfg, step)
    _close(terms["d_weight"], ref["d_weight"], rtol=1e-4)
    _close(terms["vf_weight"], ref["vf_weight"], rtol=1e-4)
    for ours, theirs in [
        ("nll_loss", "nll"),
        ("kl_loss", "kl"),
        ("g_loss", "g"),
        ("vf_loss", "vf"),
    ]:
        _close(terms[ours], ref[theirs], rtol=1e-5, atol=1e-6)
    _close(total, ref["total"], rtol=1e-5)
    assert float(terms["disc_factor"]) == (1.0 if step >= 5 else 0.0)
    # Weights are constants of the backward pass (stop_gradient = torch's .detach()): the
    # total's gradient matches torch's, which would not hold with second-order terms.
    for k in params:
        np.testing.assert_allclose(
            grads[k], ref["grads"][k], rtol=2e-4, atol=1e-5 * np.abs(ref["grads"][k]).max()
        )


def test_adaptive_weight_clamp_and_no_gradient():
    a = jnp.full((3, 3), 2.0)
    zero = jnp.zeros((3, 3))
    assert float(losses.adaptive_weight(a, zero, 1e4, 0.5)) == pytest.approx(0.5 * 1e4)
    assert float(losses.adaptive_weight(zero, a, 1e4, 0.5)) == 0.0
    # Pytrees: the norm is over all leaves.
    w = losses.adaptive_weight({"k": a, "b": a}, {"k": a}, 1e4, 1.0)
    assert float(w) == pytest.approx(np.sqrt(2.0) * 6.0 / (6.0 + 1e-4))
    g = jax.grad(lambda s: losses.adaptive_weight(s * a, a, 1e4, 1.0))(1.0)
    assert float(g) == 0.0


def test_generator_loss_without_vf_and_constant_vf_weight():
    params, fixed, x, aux, eps = _tiny_problem()
    o = _jax_pieces(params, fixed, x, aux, eps)
    cfg = losses.LossConfig(adaptive_vf=False, vf_weight=0.3, disc_factor=0.0)
    args = (x, o["xrec"], o["mean"], o["logvar"], 0.0, o["p_loss"], o["logits"])
    total, terms = losses.generator_loss(*args, o["z_proj"], aux, 2.0, None, 10**6, cfg)
    # disc_factor 0: the reference sets d_weight to 0 and drops the GAN term.
    assert float(terms["d_weight"]) == 0.0 and float(terms["vf_weight"]) == pytest.approx(0.3)
    expected = (
        terms["weighted_nll_loss"] + cfg.kl_weight * terms["kl_loss"] + 0.3 * terms["vf_loss"]
    )
    _close(total, expected)
    total_ldm, terms_ldm = losses.generator_loss(*args, None, None, 2.0, None, 0, cfg)
    assert "vf_loss" not in terms_ldm
    _close(total_ldm, terms["weighted_nll_loss"] + cfg.kl_weight * terms["kl_loss"])
    expected_keys = {
        "total_loss",
        "nll_loss",
        "weighted_nll_loss",
        "rec_loss",
        "kl_loss",
        "g_loss",
        "d_weight",
        "disc_factor",
        "vf_loss",
        "vf_weight",
        "vf_distmat",
        "vf_cos",
        "logvar",
    }
    assert set(terms) == expected_keys
    assert all(np.shape(v) == () and jnp.asarray(v).dtype == jnp.float32 for v in terms.values())


def test_generator_loss_jits_with_traced_step_and_disc_start():
    params, fixed, x, aux, eps = _tiny_problem()
    o = _jax_pieces(params, fixed, x, aux, eps)
    cfg = losses.LossConfig()

    @jax.jit
    def f(step, disc_start):
        c = dataclasses.replace(cfg, disc_start=disc_start)
        return losses.generator_loss(
            x,
            o["xrec"],
            o["mean"],
            o["logvar"],
            0.0,
            o["p_loss"],
            o["logits"],
            o["z_proj"],
            aux,
            0.5,
            0.1,
            step,
            c,
        )[1]["disc_factor"]

    assert float(f(3, 5)) == 0.0 and float(f(5, 5)) == 1.0


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x = np.zeros((2, 8, 8, 3), np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        losses.nll_loss(x, np.zeros((2, 8, 8, 4), np.float32), 0.0, None, 0.0)
    with pytest.raises(ValueError, match=r"\[B, 1, 1, 1\]"):
        losses.nll_loss(x, x, 0.0, np.zeros((2,), np.float32), 1.0)
    with pytest.raises(ValueError, match="p_loss is None"):
        losses.nll_loss(x, x, 0.0, None, 1.0)
    with pytest.raises(ValueError, match="scalar"):
        losses.nll_loss(x, x, np.zeros((2,)), None, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.vf_loss(np.zeros((2, 4, 4, 8)), np.zeros((2, 4, 4, 16)), 0.25, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        losses.kl_loss(np.zeros((2, 4, 4, 8)), np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="differ"):
        losses.discriminator_loss(
            np.zeros((2, 6, 6, 1)), np.zeros((1, 6, 6, 1)), 0, losses.LossConfig()
        )
    with pytest.raises(ValueError, match="disc_loss"):
        losses.LossConfig(disc_loss="wgan")
    with pytest.raises(TypeError, match="LossConfig"):
        losses.discriminator_loss(np.zeros((1, 6, 6, 1)), np.zeros((1, 6, 6, 1)), 0, "hinge")
    z = np.zeros((2, 4, 4, 6), np.float32)
    lg = np.zeros((2, 1, 1, 1), np.float32)
    m = np.zeros((2, 4, 4, 4), np.float32)
    p = np.zeros((2, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="adaptive vf_weight"):
        losses.generator_loss(x, x, m, m, 0.0, p, lg, z, z, 1.0, None, 0, losses.LossConfig())
    with pytest.raises(ValueError, match="vf_weight=None"):
        cfg = losses.LossConfig(adaptive_vf=False)
        losses.generator_loss(x, x, m, m, 0.0, p, lg, z, z, 1.0, 0.1, 0, cfg)
    with pytest.raises(ValueError, match="both z_proj and aux_feature"):
        losses.generator_loss(x, x, m, m, 0.0, p, lg, z, None, 1.0, 0.1, 0, losses.LossConfig())
