"""PatchGAN NLayerDiscriminator: parity with the reference fixture and a torch twin (BatchNorm in
training and eval mode, running statistics), taming's init, sharding and strict conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vavae_jax import discriminator as disc_lib
from vavae_jax.runtime import sharding
from vavae_jax.runtime.torch_names import ConversionError

torch = pytest.importorskip("torch")
nn = torch.nn

BN_INDICES = (3, 6, 9)  # BatchNorm2d positions in `main` for n_layers=3


@pytest.fixture(scope="module")
def patchgan(fixtures_dir):
    fx = np.load(fixtures_dir / "patchgan.npz")
    state = {k[len("state/") :]: fx[k] for k in fx.files if k.startswith("state/")}
    return fx, state


def _torch_twin(input_nc=3, ndf=64, n_layers=3):
    """taming's NLayerDiscriminator layer sequence, written out for the test."""
    layers = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, True),
        ]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [
        nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
        nn.BatchNorm2d(ndf * mult),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * mult, 1, 4, 1, 1),
    ]
    model = nn.Module()
    model.main = nn.Sequential(*layers)
    model.forward = lambda x: model.main(x)
    return model


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def test_train_mode_logits_match_reference_fixture(patchgan):
    fx, state = patchgan
    model = disc_lib.from_torch_state_dict(state, disc_lib.DiscriminatorConfig())
    logits = model(jnp.asarray(_nhwc(fx["x"])), train=True)
    ref = _nhwc(fx["logits_train_mode"])  # [2, 6, 6, 1]
    assert logits.shape == ref.shape and logits.dtype == jnp.float32
    # torch's own float32 result is 1.1e-5 away from a float64 evaluation here (max |logit| 2.7).
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # The reference's prefix in the official checkpoint is accepted too.
    prefixed = {f"loss.discriminator.{k}": v for k, v in state.items()}
    again = disc_lib.from_torch_state_dict(prefixed, disc_lib.DiscriminatorConfig())
    np.testing.assert_array_equal(again(jnp.asarray(_nhwc(fx["x"]))), logits)


def test_batchnorm_running_stats_and_eval_mode_match_torch_twin(patchgan):
    fx, state = patchgan
    twin = _torch_twin()
    twin.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    model = disc_lib.from_torch_state_dict(state, disc_lib.DiscriminatorConfig())
    x = np.random.default_rng(0).uniform(-1, 1, (3, 32, 40, 3)).astype(np.float32)

    twin.train()
    with torch.no_grad():
        ref_train = twin(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    out_train = model(jnp.asarray(x), train=True)
    np.testing.assert_allclose(out_train, _nhwc(ref_train), rtol=1e-5, atol=3e-5)
    for i in BN_INDICES:  # momentum 0.1, unbiased variance, as torch
        bn_t, bn = twin.main[i], model.main[i]
        np.testing.assert_allclose(bn.running_mean[...], bn_t.running_mean.numpy(), atol=1e-6)
        np.testing.assert_allclose(bn.running_var[...], bn_t.running_var.numpy(), rtol=1e-5)
        assert not np.allclose(bn.running_mean[...], state[f"main.{i}.running_mean"])

    twin.eval()
    with torch.no_grad():
        ref_eval = twin(torch.tensor(x.transpose(0, 3, 1, 2))).numpy()
    before = nnx.state(model, nnx.BatchStat)
    out_eval = model(jnp.asarray(x), train=False)
    np.testing.assert_allclose(out_eval, _nhwc(ref_eval), rtol=1e-5, atol=3e-5)
    after = nnx.state(model, nnx.BatchStat)
    jax.tree.map(np.testing.assert_array_equal, before, after)  # eval leaves the stats alone


def test_jitted_functional_step_returns_updated_stats(patchgan):
    """The trainer's pattern: split into (Param, BatchStat), merge inside jit, return the stats."""
    fx, state = patchgan
    model = disc_lib.from_torch_state_dict(state, disc_lib.DiscriminatorConfig())
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def apply(params, stats, x):
        m = nnx.merge(graphdef, params, stats)
        return m(x, train=True), nnx.state(m, nnx.BatchStat)

    x = jnp.asarray(_nhwc(fx["x"]))
    logits, new_stats = apply(params, stats, x)
    np.testing.assert_allclose(logits, model(x, train=True), rtol=1e-6, atol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7),
        new_stats,
        nnx.state(model, nnx.BatchStat),
    )


def _out_shape(config, shape):
    model = nnx.eval_shape(lambda: disc_lib.NLayerDiscriminator(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x, train=False),
        state,
        jax.ShapeDtypeStruct(shape, jnp.float32),
    )
    return out.shape, sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_shapes_and_parameter_count():
    # taming's default discriminator: the fixture's tensors (BatchNorm buffers aside).
    shape, n = _out_shape(disc_lib.DiscriminatorConfig(), (1, 256, 256, 3))
    assert shape == (1, 30, 30, 1) and n == 2_765_633
    shape, _ = _out_shape(disc_lib.DiscriminatorConfig(ndf=8, n_layers=2), (2, 12, 16, 3))
    assert shape == (2, 1, 2, 1)


def test_logical_axes_shard_conv_kernels():
    mesh = sharding.make_mesh(data=1, fsdp=-1)  # 8 fake CPU devices: fsdp=8
    cfg = disc_lib.DiscriminatorConfig(ndf=8)
    abstract = nnx.eval_shape(lambda: disc_lib.NLayerDiscriminator(cfg, rngs=nnx.Rngs(0)))
    specs = sharding.state_shardings(nnx.state(abstract), mesh, "fsdp")
    assert tuple(specs["main"][8]["kernel"].spec) == (None, None, None, "fsdp")  # [4, 4, 32, 64]
    assert tuple(specs["main"][0]["bias"].spec) == ("fsdp",)
    assert all(a is None for a in specs["main"][9]["running_var"].spec)  # BatchNorm: replicated


def test_weights_init():
    """taming weights_init: conv N(0, 0.02), BN weight N(1, 0.02), BN bias 0; torch's BN buffers
    and conv bias init."""
    cfg = disc_lib.DiscriminatorConfig(ndf=16)
    model = nnx.jit(lambda: disc_lib.NLayerDiscriminator(cfg, rngs=nnx.Rngs(0)))()
    k = np.asarray(model.main[8].kernel[...])  # [4, 4, 64, 128]
    assert abs(k.mean()) < 2e-4 and abs(k.std() - 0.02) < 2e-4
    w = np.asarray(model.main[9].weight[...])  # 128 channels
    assert abs(w.mean() - 1.0) < 8e-3 and abs(w.std() - 0.02) < 8e-3
    assert not np.any(model.main[9].bias[...]) and model.main[2].bias is None
    assert np.all(model.main[9].running_var[...] == 1.0)
    assert not np.any(model.main[9].running_mean[...])
    b = np.asarray(model.main[0].bias[...])  # uniform(+-1/sqrt(3 * 16))
    assert np.all(np.abs(b) <= 1 / np.sqrt(48)) and b.std() > 0.05


def test_conversion_errors_list_every_problem(patchgan):
    _, state = patchgan
    bad = dict(state)
    del bad["main.5.weight"]
    del bad["main.6.num_batches_tracked"]
    bad["main.0.bias"] = np.zeros((32,), np.float32)
    bad["main.12.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError) as err:
        disc_lib.from_torch_state_dict(bad, disc_lib.DiscriminatorConfig())
    msg = str(err.value)
    for needle in ("main.5.kernel", "main.6.num_batches_tracked", "main.0.bias", "main.12.weight"):
        assert needle in msg
    with pytest.raises(ConversionError, match="shape mismatches"):
        disc_lib.from_torch_state_dict(state, disc_lib.DiscriminatorConfig(ndf=32))


def test_bad_inputs():
    # Shapes are checked before any computation: an abstract model is enough.
    model = nnx.eval_shape(
        lambda: disc_lib.NLayerDiscriminator(disc_lib.DiscriminatorConfig(ndf=8), rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model(jnp.zeros((2, 3, 64, 64)))  # NCHW
    with pytest.raises(ValueError, match="at least 24x24"):
        model(jnp.zeros((2, 16, 16, 3)))
    with pytest.raises(ValueError, match="more than one value"):
        bn = nnx.eval_shape(lambda: disc_lib.BatchNorm2d(4, nnx.Rngs(0)))
        bn(jnp.zeros((1, 1, 1, 4)), train=True)
    with pytest.raises(ValueError, match="use_actnorm"):
        disc_lib.DiscriminatorConfig(use_actnorm=True)
