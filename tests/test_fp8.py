"""LightningDiT's FP8 products (lightningdit_jax/fp8.py, LightningDiTConfig.precision): the
float8 arithmetic, its backward, the weights quantised once for sampling, the model and trainer
paths in "fp8_emulated" (the same rounding on CPU), and the error for "fp8" where no FP8 tensor
cores exist."""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import fp8, sampling
from lightningdit_jax.model import PRESETS, Dense, LightningDiT, LightningDiTConfig


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def xwb():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 32, 96)).astype(np.float32))
    w = jnp.asarray((rng.standard_normal((96, 48)) / 10).astype(np.float32))
    b = jnp.asarray(rng.standard_normal(48).astype(np.float32))
    return x, w, b


def test_quantize_rounds_to_float8_and_saturates():
    a = jnp.asarray([0.0, 1.0, -3.3, 1000.0])
    s = fp8.scale_of(a[:3], fp8.E4M3)  # amax 3.3 -> 448
    q = fp8.quantize(a, s, fp8.E4M3)
    assert q.dtype == jnp.float8_e4m3fn
    np.testing.assert_allclose(q.astype(jnp.float32)[:3] * s, [0.0, 1.0, -3.3], rtol=0.07)
    assert float(q[2]) == -448.0 and float(q[3]) == 448.0  # saturates, no inf / nan
    assert float(fp8.scale_of(jnp.zeros(3), fp8.E4M3)) > 0  # all zeros: no division by 0


def test_dense_forward_and_backward_round_in_float8(xwb):
    x, w, b = xwb
    ref = x @ w + b
    y = fp8.dense(x, w, b)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = _rel(y, ref)
    assert 0.003 < err < 0.05, err  # e4m3: rounded (not float32), but close
    ct = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape).astype(np.float32))
    got = jax.grad(lambda *a: jnp.sum(fp8.dense(*a) * ct), (0, 1, 2))(x, w, b)
    want = jax.grad(lambda x, w, b: jnp.sum((x @ w + b) * ct), (0, 1, 2))(x, w, b)
    for g, e, name in zip(got, want, ("dx", "dw", "db"), strict=True):
        assert g.shape == e.shape and g.dtype == e.dtype, name
    assert 0.005 < _rel(got[0], want[0]) < 0.1  # e5m2 gradient: 2 mantissa bits
    assert 0.005 < _rel(got[1], want[1]) < 0.1
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)  # the bias gradient: not rounded
    # bf16 activations: bf16 out, bf16 gradient; the float32 kernel keeps a float32 gradient.
    xb = x.astype(jnp.bfloat16)
    gx, gw = jax.grad(lambda x, w: jnp.sum(fp8.dense(x, w, b).astype(jnp.float32)), (0, 1))(xb, w)
    yb = fp8.dense(xb, w, b)  # the product written in bf16 before its scales
    assert yb.dtype == jnp.bfloat16 and _rel(yb, ref) < 0.05
    assert (gx.dtype, gw.dtype) == (jnp.bfloat16, jnp.float32)


def test_the_products_take_float8_operands(xwb):
    """The HLO multiplies float8 arrays: e4m3 x e4m3 forward, e5m2 gradients backward (what XLA
    turns into cuBLASLt's FP8 GEMM on a GPU), not a bf16 product of rounded values."""
    x, w, b = xwb
    fwd = jax.jit(fp8.dense).lower(x, w, b).as_text()
    bwd = jax.jit(jax.grad(lambda *a: jnp.sum(fp8.dense(*a)), (0, 1))).lower(x, w, b).as_text()
    dots = [ln for ln in (fwd + bwd).splitlines() if "dot_general" in ln]
    assert dots and all("f8E4M3FN" in ln or "f8E5M2" in ln for ln in dots), dots
    assert sum("f8E5M2" in ln for ln in dots) == 2  # dx and dw


def test_weights_quantised_once_give_the_same_outputs(xwb):
    x, w, b = xwb
    stacked = jnp.stack([w, 3 * w])  # two layers: one scale each
    q = fp8.Fp8Weight.of(stacked)
    assert q.value.dtype == jnp.float8_e4m3fn and q.scale.shape == (2,)
    np.testing.assert_allclose(q.scale, [fp8.scale_of(w, fp8.E4M3), fp8.scale_of(3 * w, fp8.E4M3)])
    one = fp8.Fp8Weight(q.value[1], q.scale[1])
    np.testing.assert_array_equal(fp8.dense(x, one, b), fp8.dense(x, 3 * w, b))
    assert q[...] is q
    with pytest.raises(TypeError, match=r"w\[\.\.\.\] only"):
        q[0]


def test_delayed_scaling_takes_the_history_and_returns_the_new_one(xwb):
    x, w, _ = xwb
    x = x.reshape(-1, x.shape[-1])
    g = jnp.asarray(np.random.default_rng(5).standard_normal((x.shape[0], w.shape[1])), jnp.float32)
    g = g * 1e-4

    def loss(fn, *args):
        return jnp.sum(fn(*args) * g)

    # A history whose largest entries are this call's amaxes: the same scales as current
    # scaling, so the same float8 products.
    now = jnp.stack([fp8.amax_of(x), fp8.amax_of(w), fp8.amax_of(g)])
    history = jnp.zeros((3, 4)).at[:, 2].set(now).at[:, 3].set(now / 2)
    want = jax.value_and_grad(functools.partial(loss, fp8._product), (0, 1))(x, w)
    got = jax.value_and_grad(functools.partial(loss, fp8._product_delayed), (0, 1, 2))(
        x, w, history
    )
    np.testing.assert_array_equal(got[0], want[0])
    for a, b in zip(got[1][:2], want[1], strict=True):
        np.testing.assert_array_equal(a, b)
    # The history's "gradient" is its new value: this call's three amaxes first, then shifted.
    np.testing.assert_allclose(got[1][2][:, 0], now, rtol=1e-6)
    np.testing.assert_array_equal(got[1][2][:, 1:], history[:, :-1])
    # A smaller history saturates what lies above it; an empty one gives scale 1.
    y_small = fp8._product_delayed(x, w, history / 8)
    assert _rel(y_small, x @ w) > 5 * _rel(fp8._product(x, w), x @ w)
    np.testing.assert_array_equal(fp8.delayed_scales(jnp.zeros((3, 4))), [1.0, 1.0, 1.0])
    init = fp8.initial_history(w, 4)
    assert float(init[1, 0]) == float(now[1]) and float(jnp.sum(init)) == float(now[1])


def test_scaled_product_form_rounds_like_the_direct_one(xwb, monkeypatch):
    """`fp8.PRODUCT="scaled"` (upcast and scale inside a HIGHEST product, the pattern XLA's FP8
    GEMM rewriter folds) gives the direct form's numbers but for float32 rounding."""
    x, w, b = xwb

    def run():
        return jax.value_and_grad(lambda x, w: jnp.sum(fp8.dense(x, w, b) ** 2), (0, 1))(x, w)

    direct = run()
    monkeypatch.setattr(fp8, "PRODUCT", "scaled")
    scaled = run()
    for a, c in zip(jax.tree.leaves(scaled), jax.tree.leaves(direct), strict=True):
        assert _rel(a, c) < 1e-5
    monkeypatch.setattr(fp8, "PRODUCT", "fused")
    with pytest.raises(ValueError, match="PRODUCT='fused'"):
        run()


def _tiny(precision):
    return dataclasses.replace(PRESETS["tiny"], precision=precision)


def test_model_in_fp8_emulated_is_close_to_the_default():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 8)).astype(np.float32))
    t, y = jnp.asarray([0.3, 0.8]), jnp.asarray([1, 10])
    ref_model = LightningDiT(_tiny("default"), rngs=nnx.Rngs(0))
    model = LightningDiT(_tiny("fp8_emulated"), rngs=nnx.Rngs(0))
    # The blocks' zero-initialised layers would hide the products: perturb every parameter.
    leaves = jax.tree.leaves(nnx.state(ref_model, nnx.Param))
    keys = jax.random.split(jax.random.key(3), len(leaves))
    noise = [0.05 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)]
    for m in (ref_model, model):
        params = nnx.state(m, nnx.Param)
        nnx.update(m, jax.tree.map(lambda p, n: p + n, params, jax.tree.unflatten(
            jax.tree.structure(params), noise)))  # fmt: skip
    # Same parameters, so checkpoints load either way.
    assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(ref_model))
    want, got = ref_model(x, t, y), model(x, t, y)
    assert 0.001 < _rel(got, want) < 0.1, _rel(got, want)
    fp8_layers = {
        "/".join(path) for path, m in nnx.iter_graph(model) if isinstance(m, Dense) and m.fp8
    }  # the (stacked) blocks' four linear layers
    assert fp8_layers == {"blocks/attn/qkv", "blocks/attn/proj", "blocks/mlp/w12", "blocks/mlp/w3"}

    # The sampler's copy with the kernels quantised once: the same float8 weights, so the same
    # outputs but for the order of some float32 operations.
    quantised = fp8.quantize_weights(model)
    np.testing.assert_allclose(quantised(x, t, y), got, rtol=0, atol=1e-6)
    assert not isinstance(model.blocks.attn.qkv.kernel[...], fp8.Fp8Weight)  # original untouched
    z0 = jnp.asarray(rng.standard_normal((2, 8, 8, 8)).astype(np.float32))
    g = sampling.Guidance(cfg_scale=1.0)
    out = sampling.sample_ode(model, z0, y, num_steps=3, guidance=g)
    out_ref = sampling.sample_ode(ref_model, z0, y, num_steps=3, guidance=g)
    assert np.isfinite(np.asarray(out)).all() and 0 < _rel(out, out_ref) < 0.1


def test_precision_is_checked():
    with pytest.raises(ValueError, match="precision='fp16'"):
        LightningDiTConfig(precision="fp16")
    with pytest.raises(ValueError, match="needs GPUs with FP8 tensor cores.*cpu device"):
        LightningDiT(_tiny("fp8"), rngs=nnx.Rngs(0))
    old = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA A100", compute_capability="8.0")
    new = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", compute_capability="9.0")
    with pytest.raises(ValueError, match="A100.*compute 8.0"):
        fp8.check_backend("fp8", [old])
    fp8.check_backend("fp8", [new])
    fp8.check_backend("default", [old])


def test_xla_flags_only_for_fp8():
    assert fp8.xla_flags("--a=1", "default") == "--a=1"
    assert fp8.xla_flags("--a=1", "fp8") == "--a=1 --xla_gpu_enable_triton_gemm=false"
    kept = "--xla_gpu_enable_triton_gemm=true"
    assert fp8.xla_flags(kept, "fp8") == kept  # the user's own setting wins


@pytest.mark.slow
def test_trainer_step_in_fp8_delayed_and_checkpoints_load_either_way(tmp_path):
    """Two steps of the trainer's own step (loss, AdamW, EMA) with the blocks in FP8 and delayed
    scaling on the FSDP mesh, its latent grid sampled with the weights quantised once: the
    amax histories advance one entry a step and are checkpointed; the checkpoint then loads as
    a default-precision model, with its histories, and with current scaling."""
    import ml_collections

    from lightningdit_jax import train
    from tests.test_lightningdit_train import tiny_config, write_latents
    from vavae_jax.runtime import sharding

    write_latents(tmp_path / "latents")
    cfg = tiny_config(tmp_path / "latents")
    cfg.model.precision = "fp8_emulated"
    cfg.model.fp8_scaling = "delayed"
    cfg.model.fp8_amax_history = 4
    cfg.total_steps = cfg.checkpoint_every_steps = cfg.image_every_steps = 2
    out = train.run(cfg, str(tmp_path / "run"))
    assert out["step"] == 2 and list((tmp_path / "run" / "samples").glob("latent_*.png"))
    params = jax.tree.leaves(jax.device_get(out["state"]["params"]))
    assert all(np.isfinite(np.asarray(p)).all() for p in params)
    histories = jax.device_get(out["state"]["fp8"])
    leaves = jax.tree.leaves(histories)
    assert len(leaves) == 4  # qkv, proj, w12, w3, each [depth, 3, 4]
    for h in leaves:
        assert h.shape == (2, 3, 4)
        # Input row: two steps seen. Kernel row: the amax at init, then two. Gradient row: two
        # steps seen, both 0 here: the final layer and the gates start at zero (the
        # reference's init), so no gradient reaches the blocks in the first two steps.
        assert (h[:, 0, :2] > 0).all() and (h[:, 0, 2:] == 0).all(), h
        assert (h[:, 1, :3] > 0).all() and (h[:, 1, 3] == 0).all(), h
        assert (h[:, 2] == 0).all(), h
    mesh = sharding.make_mesh(-1, 1)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 8, 8, 8)).astype(np.float32))
    t, y = jnp.asarray([0.2, 0.9]), jnp.asarray([3, 4])
    run_config = json.loads((tmp_path / "run" / "config.json").read_text())
    outs = {}
    for name, precision, scaling in [
        ("default", "default", "delayed"),
        ("delayed", "fp8_emulated", "delayed"),
        ("current", "fp8_emulated", "current"),
    ]:
        config = ml_collections.ConfigDict(run_config)
        config.model.fp8_scaling = scaling
        ema, _, _ = train.load_ema_model(
            str(tmp_path / "run"), mesh, precision=precision, config=config
        )
        assert (ema.config.precision, ema.config.fp8_scaling) == (precision, scaling)
        if name == "delayed":  # the run's histories, restored
            restored = jax.device_get(nnx.state(ema, fp8.AmaxHistory))
            for a, b in zip(jax.tree.leaves(restored), leaves, strict=True):
                np.testing.assert_array_equal(a, b)
        outs[name] = np.asarray(ema(x, t, y))
    assert 0 < _rel(outs["delayed"], outs["default"]) < 0.1
    assert 0 < _rel(outs["current"], outs["default"]) < 0.1
