"""The VA-VAE autoencoder: parity with the reference, shapes, parameter counts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vavae_jax import convert
from vavae_jax.model import PRESETS, AutoencoderConfig, AutoencoderKL, count_params


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def tiny_fixture(fixtures_dir):
    return np.load(fixtures_dir / "vavae_tiny.npz")


def _fixture_model(fx):
    import json

    meta = json.loads(str(fx["meta_json"]))
    cfg = AutoencoderConfig(**meta["ddconfig"], embed_dim=meta["embed_dim"])
    state = {k[len("state/") :]: fx[k] for k in fx.files if k.startswith("state/")}
    return convert.from_torch_state_dict(state, cfg), cfg


def test_parity_with_reference_fixture(tiny_fixture):
    fx = tiny_fixture
    model, cfg = _fixture_model(fx)
    assert cfg == PRESETS["tiny"]
    post = model.encode(jnp.asarray(_nhwc(fx["x"])))
    assert _rel(post.mean, _nhwc(fx["mean"])) < 1e-5
    assert _rel(post.logvar, _nhwc(fx["logvar"])) < 1e-5
    assert _rel(post.kl(), fx["kl"]) < 1e-5
    rec = model.decode(post.mode())
    assert _rel(rec, _nhwc(fx["rec_of_mean"])) < 1e-5


def test_posterior_sample_and_clamp():
    from vavae_jax.model import DiagonalGaussian

    moments = jnp.concatenate([jnp.zeros((2, 4, 4, 3)), jnp.full((2, 4, 4, 3), 50.0)], -1)
    post = DiagonalGaussian.from_moments(moments)
    assert float(post.logvar.max()) == 20.0
    post = DiagonalGaussian(
        mean=jnp.ones((4096, 1, 1, 1)), logvar=jnp.full((4096, 1, 1, 1), np.log(4.0))
    )
    s = np.asarray(post.sample(jax.random.key(0)))
    assert abs(s.mean() - 1.0) < 0.1 and abs(s.std() - 2.0) < 0.1


def _reference_param_count(cfg: AutoencoderConfig) -> int:
    """Independent count from the reference architecture's layer list (not from our modules)."""

    def conv(i, o, k):
        return i * o * k * k + o

    def norm(c):
        return 2 * c

    def resblock(i, o):
        return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    def attn(c):
        return norm(c) + 4 * conv(c, c, 1)

    ch, mult, nrb = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
    total = conv(cfg.in_channels, ch, 3)
    res, block_in = cfg.resolution, ch
    for i, m in enumerate(mult):
        block_in = ch * ((1,) + mult)[i]
        for _ in range(nrb):
            total += resblock(block_in, ch * m)
            block_in = ch * m
            total += attn(block_in) if res in cfg.attn_resolutions else 0
        if i != len(mult) - 1:
            total += conv(block_in, block_in, 3)
            res //= 2
    total += 2 * resblock(block_in, block_in) + attn(block_in) + norm(block_in)
    total += conv(block_in, 2 * cfg.z_channels, 3)
    # decoder
    block_in = ch * mult[-1]
    res = cfg.resolution // 2 ** (len(mult) - 1)
    total += conv(cfg.z_channels, block_in, 3) + 2 * resblock(block_in, block_in) + attn(block_in)
    for i in reversed(range(len(mult))):
        for _ in range(nrb + 1):
            total += resblock(block_in, ch * mult[i])
            block_in = ch * mult[i]
            total += attn(block_in) if res in cfg.attn_resolutions else 0
        if i != 0:
            total += conv(block_in, block_in, 3)
            res *= 2
    total += norm(block_in) + conv(block_in, cfg.out_ch, 3)
    total += conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1) + conv(cfg.embed_dim, cfg.z_channels, 1)
    return total


def test_tiny_count_matches_fixture(tiny_fixture):
    n_ref = sum(tiny_fixture[k].size for k in tiny_fixture.files if k.startswith("state/"))
    assert _reference_param_count(PRESETS["tiny"]) == n_ref
    assert count_params(AutoencoderKL(PRESETS["tiny"], rngs=nnx.Rngs(0))) == n_ref


@pytest.mark.parametrize(
    "name,expected",
    [
        # f16d32 (VA-VAE): 69,836,067 parameters in the reference AutoencoderKL (encoder, decoder,
        # quant_conv, post_quant_conv; the loss, teacher and VF projection not counted).
        ("f16d32", 69_836_067),
        ("f16d16", None),
        ("f16d64", None),
        ("ldm-f8d4", 83_653_863),
        ("ldm-f16d16", None),
    ],
)
def test_full_size_param_counts(name, expected):
    cfg = PRESETS[name]
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    n = count_params(abstract)
    assert n == _reference_param_count(cfg)
    if expected is not None:
        assert n == expected


def test_full_size_shapes():
    cfg = PRESETS["f16d32"]
    model = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    graphdef, state = nnx.split(model)

    def enc(state, x):
        m = nnx.merge(graphdef, state)
        post = m.encode(x)
        return post.mean, m.decode(post.mean)

    mean, rec = jax.eval_shape(enc, state, x)
    assert mean.shape == (2, 16, 16, 32) and rec.shape == (2, 256, 256, 3)


def test_bad_inputs():
    model = AutoencoderKL(PRESETS["tiny"], rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model.encode(jnp.zeros((2, 3, 32, 32)))  # NCHW
    with pytest.raises(ValueError, match="floating-point"):
        model.encode(jnp.zeros((2, 32, 32, 3), jnp.uint8))
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(jnp.zeros((2, 30, 30, 3)))
    with pytest.raises(ValueError, match="latents"):
        model.decode(jnp.zeros((2, 8, 8, 5)))


def test_converter_is_strict(tiny_fixture):
    state = {
        k[len("state/") :]: tiny_fixture[k] for k in tiny_fixture.files if k.startswith("state/")
    }
    cfg = PRESETS["tiny"]
    bad = dict(state)
    bad.pop("decoder.conv_out.bias")
    bad["encoder.extra.weight"] = np.zeros(3)
    bad["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(convert.ConversionError) as e:
        convert.from_torch_state_dict(bad, cfg)
    msg = str(e.value)
    assert "encoder.extra.weight" in msg and "decoder.conv_out.bias" in msg
    assert "encoder.conv_in.weight" in msg
    with pytest.raises(convert.ConversionError, match="no autoencoder weights"):
        convert.from_torch_state_dict({"pos_embed": np.zeros((1, 4, 8))}, cfg)
    with pytest.raises(convert.ConversionError, match="does not match"):
        convert.from_torch_state_dict(state, PRESETS["f16d32"])


def test_group_norm_equals_torch_and_the_grouped_form():
    """model.group_norm (per-channel sums first) is torch.nn.GroupNorm(32, C, eps=1e-6) in
    float32, with a mean far from 0 (the two-pass variance), and equals the grouped 5-D form it
    replaced, values and input gradients."""
    torch = pytest.importorskip("torch")
    from vavae_jax import model

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 8, 6, 64)) * 0.5 + 3.0).astype(np.float32)  # NHWC
    w = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    b = rng.uniform(-0.2, 0.2, 64).astype(np.float32)
    ref = torch.nn.GroupNorm(32, 64, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        ref.bias.copy_(torch.from_numpy(b))
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = np.asarray(model.group_norm(jnp.asarray(x), w, b, 32, 1e-6))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)

    ct = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    grads = [
        jax.grad(lambda x, f=f: jnp.sum(f(x, w, b, 32, 1e-6) * ct))(jnp.asarray(x))
        for f in (model.group_norm, model.group_norm_grouped)
    ]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    grouped = np.asarray(model.group_norm_grouped(jnp.asarray(x), w, b, 32, 1e-6))
    np.testing.assert_allclose(got, grouped, rtol=1e-5, atol=2e-5)


def test_group_norm_written_backward(monkeypatch):
    """`model.group_norm_vjp` (the written backward, model.GROUP_NORM_BACKWARD="written") has
    the values and gradients of model.group_norm in float32: x, weight and bias; and the model's
    GroupNorm layer takes it when switched."""
    from vavae_jax import model

    rng = np.random.default_rng(1)
    x = jnp.asarray((rng.standard_normal((2, 6, 5, 64)) * 0.7 - 1.5).astype(np.float32))
    w = jnp.asarray(rng.uniform(0.5, 1.5, 64).astype(np.float32))
    b = jnp.asarray(rng.uniform(-0.2, 0.2, 64).astype(np.float32))
    ct = jnp.asarray(rng.standard_normal(x.shape).astype(np.float32))
    want_y = model.group_norm(x, w, b, 32, 1e-6)
    got_y = model.group_norm_vjp(x, w, b, 32, 1e-6)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-6, atol=1e-6)
    want = jax.grad(lambda *a: jnp.sum(model.group_norm(*a, 32, 1e-6) * ct), (0, 1, 2))(x, w, b)
    got = jax.grad(lambda *a: jnp.sum(model.group_norm_vjp(*a, 32, 1e-6) * ct), (0, 1, 2))(x, w, b)
    for g, e, name in zip(got, want, ("dx", "dweight", "dbias"), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=name)

    layer = model.GroupNorm(64, rngs=nnx.Rngs(0))
    jaxpr = {}
    for form in ("autodiff", "written"):
        monkeypatch.setattr(model, "GROUP_NORM_BACKWARD", form)
        jaxpr[form] = str(jax.make_jaxpr(lambda x: layer(x))(x))  # a new function: no trace cache
    assert "custom_vjp" in jaxpr["written"] and "custom_vjp" not in jaxpr["autodiff"]
    monkeypatch.setattr(model, "GROUP_NORM_BACKWARD", "fused")
    with pytest.raises(ValueError, match="GROUP_NORM_BACKWARD='fused'"):
        layer(x)
