"""LightningDiT: parity with the reference, parameter counts of every preset, init, switches."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lightningdit_jax import PRESETS, LightningDiT, LightningDiTConfig, kernels
from lightningdit_jax.convert import from_torch_state_dict
from lightningdit_jax.kernels import apply_rope, rms_modulate, split_rope, swiglu
from lightningdit_jax.model import (
    Buffer,
    Dense,
    LabelEmbedder,
    RMSNorm,
    abstract_model,
    count_params,
    get_2d_sincos_pos_embed,
    modulate,
    rope_tables,
)
from vavae_jax.runtime import sharding

FIXTURES = ("lightningdit_tiny_paper", "lightningdit_tiny_variant")


def nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_rel_close(ours, ref, tol):
    """max |ours - ref| <= tol * max |ref| (relative to the scale of the reference output)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def normal(seed, shape):
    """Test inputs from numpy (jax.random compiles a new program for every shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def load_reference(fixtures_dir, name):
    """(config, torch state dict, arrays) of a reference fixture."""
    fx = np.load(fixtures_dir / f"{name}.npz")
    config = LightningDiTConfig(**json.loads(str(fx["meta_json"]))["kwargs"])
    state = {k[len("state/") :]: fx[k] for k in fx.files if k.startswith("state/")}
    return config, state, fx


@nnx.jit(static_argnames="train")
def forward(model, x, t, y, train=False, rng=None):
    """A jitted call: eager calls compile every primitive separately, which is slow on CPU."""
    return model(x, t, y, train=train, rng=rng)


def init_model(cfg, seed=0):
    """The reference initialisation, run as one jitted function."""
    graphdef, _ = nnx.split(abstract_model(cfg))
    state = jax.jit(lambda: nnx.state(LightningDiT(cfg, rngs=nnx.Rngs(seed))))()
    return nnx.merge(graphdef, state)


@pytest.fixture(scope="module", params=FIXTURES)
def reference(request, fixtures_dir):
    config, state, fx = load_reference(fixtures_dir, request.param)
    return from_torch_state_dict(state, config), state, fx


def test_forward_matches_reference(reference):
    model, _, fx = reference
    out = forward(model, nhwc(fx["x"]), jnp.asarray(fx["t"]), jnp.asarray(fx["y"]))
    assert out.dtype == jnp.float32
    assert_rel_close(out, nhwc(fx["out"]), 1e-5)


def test_tiny_preset_is_the_paper_fixture(fixtures_dir):
    config, _, _ = load_reference(fixtures_dir, "lightningdit_tiny_paper")
    assert config == PRESETS["tiny"]


def test_fixed_tables_equal_the_reference_buffers(reference):
    model, state, _ = reference
    cfg = model.config
    table = get_2d_sincos_pos_embed(cfg.hidden_size, cfg.grid_size)
    np.testing.assert_allclose(table, state["pos_embed"][0], atol=1e-6)
    if cfg.use_rope:
        cos, sin = rope_tables(cfg.head_dim, cfg.grid_size)
        np.testing.assert_allclose(cos, state["feat_rope.freqs_cos"], atol=1e-6)
        np.testing.assert_allclose(sin, state["feat_rope.freqs_sin"], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Parameter counts. The formula follows the shapes of the reference modules (nn.Linear weight +
# bias, Conv2d patch embedding, nn.Embedding with the null row, RMSNorm weights, the nn.Parameter
# pos_embed); it is checked against the reference's own state dicts (the fixtures) first.


def reference_param_count(
    depth,
    hidden,
    patch,
    heads,
    *,
    in_channels=32,
    input_size=16,
    num_classes=1000,
    class_dropout_prob=0.1,
    mlp_ratio=4.0,
    use_swiglu=True,
    use_rmsnorm=True,
    use_qknorm=False,
    wo_shift=False,
    learn_sigma=False,
):
    d, p = hidden, patch
    tokens = (input_size // p) ** 2
    out_channels = in_channels * (2 if learn_sigma else 1)
    head_dim = d // heads
    total = in_channels * p * p * d + d  # x_embedder.proj
    total += tokens * d  # pos_embed
    total += 256 * d + d + d * d + d  # t_embedder.mlp
    total += (num_classes + int(class_dropout_prob > 0)) * d  # y_embedder
    mlp_hidden = int(d * mlp_ratio)
    if use_swiglu:
        h = int(2 / 3 * mlp_hidden)
        mlp = d * 2 * h + 2 * h + h * d + d
    else:
        mlp = d * mlp_hidden + mlp_hidden + mlp_hidden * d + d
    n_mod = 4 if wo_shift else 6
    block = (2 * d if use_rmsnorm else 0) + (d * 3 * d + 3 * d) + (d * d + d) + mlp
    block += (2 * head_dim if use_rmsnorm else 4 * head_dim) if use_qknorm else 0
    block += d * n_mod * d + n_mod * d
    total += depth * block
    total += (d if use_rmsnorm else 0) + d * p * p * out_channels + p * p * out_channels
    total += d * 2 * d + 2 * d
    return total


# (depth, hidden, patch, heads) of the reference LightningDiT_models, and the counts the formula
# gives with SwiGLU + RMSNorm + RoPE at 16x16x32 input (the reference logs XL/1 as 675.26M).
PRESET_SIZES = {
    "B/1": ((12, 768, 1, 12), 130_556_192),
    "B/2": ((12, 768, 2, 12), 130_556_288),
    "L/2": ((24, 1024, 2, 16), 458_153_056),
    "XL/1": ((28, 1152, 1, 16), 675_256_736),
    "XL/2": ((28, 1152, 2, 16), 675_256_832),
    "1p0B/1": ((24, 1536, 1, 24), 1_029_401_120),
    "1p0B/2": ((24, 1536, 2, 24), 1_029_401_216),
    "1p6B/1": ((28, 1792, 1, 28), 1_631_767_120),
    "1p6B/2": ((28, 1792, 2, 28), 1_631_767_216),
}


@pytest.mark.parametrize("name", FIXTURES)
def test_count_formula_matches_reference_state_dicts(fixtures_dir, name):
    config, state, _ = load_reference(fixtures_dir, name)
    ref = sum(v.size for k, v in state.items() if not k.startswith("feat_rope."))
    kwargs = {
        f: getattr(config, f)
        for f in (
            "in_channels",
            "input_size",
            "num_classes",
            "class_dropout_prob",
            "mlp_ratio",
            "use_swiglu",
            "use_rmsnorm",
            "use_qknorm",
            "wo_shift",
            "learn_sigma",
        )
    }
    sizes = (config.depth, config.hidden_size, config.patch_size, config.num_heads)
    assert reference_param_count(*sizes, **kwargs) == ref
    assert count_params(abstract_model(config)) == ref


def test_preset_param_counts():
    assert set(PRESET_SIZES) <= set(PRESETS)
    for name, (sizes, expected) in PRESET_SIZES.items():
        cfg = PRESETS[name]
        assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads) == sizes, name
        assert reference_param_count(*sizes) == expected, name
        assert count_params(abstract_model(cfg)) == expected, name
    assert round(PRESET_SIZES["XL/1"][1] / 1e6, 2) == 675.26


def test_every_weight_has_logical_axes_and_blocks_are_stacked():
    cfg = PRESETS["XL/1"]
    state = nnx.state(abstract_model(cfg))
    for path, var in nnx.to_flat_state(state):
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape), (path, names, var.shape)
        assert all(n is None or n in sharding.LOGICAL_AXES for n in names), (path, names)
        if path[0] == "blocks":
            assert var.shape[0] == cfg.depth and names[0] is None, path
    qkv = state["blocks"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (28, 1152, 3 * 1152)


# ---------------------------------------------------------------------------------------------
# Initialisation (reference LightningDiT.initialize_weights)


def test_reference_initialisation():
    cfg = LightningDiTConfig(
        input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4,
        num_classes=10, use_swiglu=True, use_rmsnorm=True, use_rope=True,
    )  # fmt: skip
    model = init_model(cfg)
    s = nnx.state(model)

    def bound(fan_in, fan_out):  # xavier-uniform limit
        return np.sqrt(6 / (fan_in + fan_out))

    qkv = np.asarray(s["blocks"]["attn"]["qkv"]["kernel"][...])
    assert np.abs(qkv).max() <= bound(128, 384) and np.abs(qkv).max() > 0.9 * bound(128, 384)
    patch = np.asarray(s["x_embedder"]["proj"]["kernel"][...])  # [2, 2, 4, 128]
    fan_in = 2 * 2 * 4  # the reference views the conv kernel as a Linear
    assert np.abs(patch).max() <= bound(fan_in, 128)
    assert np.abs(patch).max() > 0.9 * bound(fan_in, 128)
    for name in ("mlp_0", "mlp_2"):
        w = np.asarray(s["t_embedder"][name]["kernel"][...])
        assert abs(w.std() - 0.02) < 0.002
    table = np.asarray(s["y_embedder"]["embedding_table"]["embedding"][...])
    assert table.shape == (11, 128) and abs(table.std() - 0.02) < 0.003
    zero = [
        s["blocks"]["adaLN_modulation"]["kernel"],
        s["blocks"]["adaLN_modulation"]["bias"],
        s["final_layer"]["adaLN_modulation"]["kernel"],
        s["final_layer"]["linear"]["kernel"],
        s["final_layer"]["linear"]["bias"],
        s["blocks"]["attn"]["qkv"]["bias"],
    ]
    assert all(not np.any(np.asarray(v[...])) for v in zero)
    np.testing.assert_array_equal(s["blocks"]["norm1"]["weight"][...], 1.0)
    np.testing.assert_allclose(s["pos_embed"][...][0], get_2d_sincos_pos_embed(128, 4), atol=1e-7)
    assert isinstance(model.pos_embed, Buffer) and not isinstance(model.pos_embed, nnx.Param)
    # Zeroed output layer: the untrained model predicts zero velocity.
    x = normal(1, (2, 8, 8, 4))
    out = forward(model, x, jnp.array([0.3, 0.7]), jnp.array([1, 10]))
    assert out.shape == (2, 8, 8, 4) and not np.any(np.asarray(out))


# ---------------------------------------------------------------------------------------------
# Switches that the fixtures do not cover


def _inputs(cfg, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels))
    x, t = jnp.asarray(x, jnp.float32), jnp.asarray(rng.uniform(size=batch), jnp.float32)
    return x, t, jnp.arange(batch) % cfg.num_classes


def test_label_dropout_in_training_only():
    embedder = LabelEmbedder(10, 16, 0.5, rngs=nnx.Rngs(0))
    labels = jnp.arange(64) % 10
    table = np.asarray(embedder.embedding_table.embedding[...])
    assert table.shape == (11, 16)  # the extra row is the null label
    np.testing.assert_array_equal(embedder(labels), table[labels])  # deterministic in eval
    dropped_out = np.asarray(embedder(labels, train=True, rng=jax.random.key(3)))
    dropped = np.all(dropped_out == table[10], axis=1)
    np.testing.assert_array_equal(dropped_out[~dropped], table[labels][~dropped])
    assert 16 <= dropped.sum() <= 48
    with pytest.raises(ValueError, match="rng"):
        embedder(labels, train=True)
    model = abstract_model(PRESETS["tiny"])
    x, t, y = _inputs(PRESETS["tiny"])
    with pytest.raises(ValueError, match="rng"):
        nnx.eval_shape(lambda m: m(x, t, y, train=True), model)


@pytest.mark.parametrize(
    "variant",
    [
        dict(remat_policy="full"),
        dict(remat_policy="save_bf16"),
        dict(scan_layers=False),
        dict(scan_layers=False, remat_policy="dots_no_batch"),
    ],
    ids=["remat-full", "remat-save_bf16", "loop", "loop-remat-dots_no_batch"],
)
def test_remat_and_layer_loop_do_not_change_values_or_gradients(fixtures_dir, variant):
    base, state, fx = load_reference(fixtures_dir, "lightningdit_tiny_variant")
    x, t, y = nhwc(fx["x"]), jnp.asarray(fx["t"]), jnp.asarray(fx["y"])

    @nnx.jit
    def value_and_grad(model):
        return nnx.value_and_grad(lambda m: jnp.mean(m(x, t, y) ** 2))(model)

    def loss_and_grad(cfg):
        return value_and_grad(from_torch_state_dict(state, cfg))

    other = dataclasses.replace(base, **variant)
    ref_loss, ref_grad = loss_and_grad(base)
    loss, grad = loss_and_grad(other)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
        nnx.to_pure_dict(grad),
        nnx.to_pure_dict(ref_grad),
    )

    def jaxpr(cfg):
        graphdef, params = nnx.split(abstract_model(cfg))
        return str(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(x, t, y))(params))

    text = jaxpr(other)
    assert ("remat" in text) == ("remat_policy" in variant) and "remat" not in jaxpr(base)
    # The layer loop has one copy of the block per layer and no scan over them.
    assert ("scan" in text) == other.scan_layers
    assert "unroll=2" in jaxpr(dataclasses.replace(base, scan_unroll=2))


def test_save_bf16_policy_keeps_the_named_activations():
    """`save_bf16` recomputes fewer matmuls in the backward pass than `dots_no_batch`: the
    attention output is kept, so of the XLA attention (CPU) only the scores matmul is recomputed
    (for the softmax probabilities); cuDNN's attention is kept whole (its custom VJP)."""
    cfg = dataclasses.replace(PRESETS["tiny"], depth=2, dtype="bfloat16")
    x, t, y = _inputs(cfg)

    def dots(policy):
        graphdef, params = nnx.split(abstract_model(dataclasses.replace(cfg, remat_policy=policy)))
        fn = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x, t, y) ** 2))
        return str(jax.make_jaxpr(fn)(params)).count("dot_general")

    counts = {p: dots(p) for p in ("none", "save_bf16", "dots_no_batch", "full")}
    assert counts["save_bf16"] == counts["none"] + 1, counts
    assert counts["save_bf16"] < counts["dots_no_batch"] < counts["full"], counts


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_custom_gradients_equal_autodiff(dtype, tol):
    """split_rope and swiglu carry hand-written backward passes (one fused gradient buffer each);
    values and gradients equal autodiff through the plain slicing / apply_rope / silu code."""
    cos, sin = (jnp.asarray(t) for t in rope_tables(8, 4))  # 16 tokens, head_dim 8
    qkv = jax.random.normal(jax.random.key(0), (2, 16, 3, 3, 8)).astype(dtype)
    h = jax.random.normal(jax.random.key(1), (2, 16, 12)).astype(dtype)

    def plain_rope(qkv):
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return apply_rope(q, cos, sin).astype(dtype), apply_rope(k, cos, sin).astype(dtype), v

    def plain_swiglu(h):
        a, b = jnp.split(h, 2, axis=-1)
        return jax.nn.silu(a) * b

    for fast, plain, x, seed in (
        (lambda x: split_rope(x, cos, sin), plain_rope, qkv, 2),
        (swiglu, plain_swiglu, h, 3),
    ):
        y_fast, vjp_fast = jax.vjp(fast, x)
        y_plain, vjp_plain = jax.vjp(plain, x)
        for a, b in zip(jax.tree.leaves(y_fast), jax.tree.leaves(y_plain)):
            assert a.dtype == b.dtype == dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
        keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(y_fast)))
        cot = jax.tree.unflatten(
            jax.tree.structure(y_fast),
            [
                jax.random.normal(k, y.shape).astype(dtype)
                for k, y in zip(keys, jax.tree.leaves(y_fast))
            ],
        )
        (g_fast,), (g_plain,) = vjp_fast(cot), vjp_plain(cot)
        assert g_fast.dtype == dtype and g_fast.shape == x.shape
        assert_rel_close(g_fast, g_plain, tol)


def test_swiglu_keeps_its_coefficients_not_its_input():
    """The backward reads one [..., 2, n] residual in h's dtype (the two derivative
    coefficients), not h itself, from which XLA hoisted a float32 coefficient (BENCHMARKS run 34)."""
    h = jax.random.normal(jax.random.key(0), (2, 5, 12)).astype(jnp.bfloat16)
    out, res = kernels._swiglu_fwd(h)
    assert res.shape == (2, 5, 2, 6) and res.dtype == jnp.bfloat16
    a, b = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    sig = jax.nn.sigmoid(a)
    want = jnp.stack([b * sig * (1 + a * (1 - sig)), a * sig], axis=-2).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(res, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(swiglu(h), np.float32))


@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_rms_modulate_equals_the_layers(out_dtype):
    """rms_modulate: the same values as RMSNorm then modulate (bit for bit), and the gradients
    of autodiff through them for x, the norm weight, scale and shift."""
    kx, kw, ks, kb, kg = jax.random.split(jax.random.key(0), 5)
    x = 3.0 * jax.random.normal(kx, (3, 16, 24))
    w = 1.0 + 0.3 * jax.random.normal(kw, (24,))
    scale = 0.5 * jax.random.normal(ks, (3, 24))
    shift = jax.random.normal(kb, (3, 24))
    graphdef, state = nnx.split(RMSNorm(24))

    def plain(x, w, scale, shift):
        norm = nnx.merge(graphdef, jax.tree.map(lambda _: w, state))
        return modulate(norm(x), shift, scale).astype(out_dtype)

    def fast(x, w, scale, shift):
        return rms_modulate(x, w, scale, shift, 1e-6, out_dtype)

    y_fast, vjp_fast = jax.vjp(fast, x, w, scale, shift)
    y_plain, vjp_plain = jax.vjp(plain, x, w, scale, shift)
    assert y_fast.dtype == out_dtype
    np.testing.assert_array_equal(np.asarray(y_fast, np.float32), np.asarray(y_plain, np.float32))
    cot = jax.random.normal(kg, y_fast.shape).astype(out_dtype)
    for a, b, name in zip(vjp_fast(cot), vjp_plain(cot), ("x", "weight", "scale", "shift")):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_rel_close(a, b, 1e-5)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_dense_equals_nnx_linear(dtype):
    """Dense (the custom-VJP product): nnx.Linear's outputs bit for bit, and autodiff's gradients
    of nnx.Linear for the input, kernel and bias, also inside jax.checkpoint with a policy."""
    kw = dict(use_bias=True, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ours, ref = Dense(24, 40, custom_grad=True, **kw), nnx.Linear(24, 40, **kw)
    # Non-zero bias, same parameters in both.
    ref.bias[...] = jax.random.normal(jax.random.key(3), (40,))
    nnx.update(ours, nnx.state(ref))
    x = jax.random.normal(jax.random.key(1), (3, 16, 24))
    cot = jax.random.normal(jax.random.key(2), (3, 16, 40)).astype(dtype or jnp.float32)

    def apply(layer, remat):
        graphdef, state = nnx.split(layer)

        def f(x, state):
            return nnx.merge(graphdef, state)(x)

        if remat:
            f = jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        return jax.vjp(f, x, state)

    y_ref, vjp_ref = apply(ref, False)
    g_ref = vjp_ref(cot)
    for remat in (False, True):
        y, vjp = apply(ours, remat)
        assert y.dtype == y_ref.dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
        g = vjp(cot)
        leaves, leaves_ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
        assert len(leaves) == len(leaves_ref) == 3  # x, bias, kernel
        # bf16: one rounding of the same sums, in another order.
        for a, b in zip(leaves, leaves_ref, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert_rel_close(a, b, 1e-5 if dtype is None else 1e-2)


def test_blocks_use_dense_custom_grad_only_without_remat():
    """`dense`'s backward measured faster without remat and slower under `dots_no_batch`
    (docs/bench/JOURNAL.md run 29): the blocks' linear layers use it exactly when remat is off; the
    embedders and the final layer never do."""
    for policy, expected in (("none", True), ("dots_no_batch", False), ("save_bf16", False)):
        model = abstract_model(dataclasses.replace(PRESETS["tiny"], remat_policy=policy))
        blk = model.blocks
        layers = (blk.attn.qkv, blk.attn.proj, blk.mlp.w12, blk.mlp.w3, blk.adaLN_modulation)
        assert [lay.custom_grad for lay in layers] == [expected] * 5, policy
        assert not model.final_layer.linear.custom_grad
        assert not model.t_embedder.mlp_0.custom_grad


def test_learn_sigma_drops_the_sigma_half():
    cfg = dataclasses.replace(PRESETS["tiny"], learn_sigma=True)
    model = abstract_model(cfg)
    assert model.final_layer.linear.kernel.shape == (64, 2 * cfg.in_channels)
    x, t, y = _inputs(cfg)
    out = nnx.eval_shape(lambda m: m(x, t, y), model)
    assert out.shape == x.shape  # the reference forward keeps the first half of the channels


def test_bfloat16_compute(reference):
    model, _, fx = reference
    bf16 = dataclasses.replace(model.config, dtype="bfloat16")
    model16 = nnx.merge(nnx.graphdef(abstract_model(bf16)), nnx.state(model))
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(model16)))
    out16 = forward(model16, nhwc(fx["x"]), jnp.asarray(fx["t"]), jnp.asarray(fx["y"]))
    assert out16.dtype == jnp.float32
    assert_rel_close(out16, nhwc(fx["out"]), 3e-2)


def test_sharded_state_and_forward(fixtures_dir):
    """Weights split by the logical rules (fsdp over 4 devices), batch over the same devices."""
    config, state, fx = load_reference(fixtures_dir, "lightningdit_tiny_paper")
    model = from_torch_state_dict(state, config)
    mesh = sharding.make_mesh(data=1, fsdp=4, devices=jax.devices()[:4])
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh, "fsdp")
    assert shardings["blocks"]["attn"]["qkv"]["kernel"].spec == P(None, "fsdp", None)
    assert shardings["blocks"]["attn"]["proj"]["kernel"].spec == P(None, None, "fsdp")
    assert shardings["y_embedder"]["embedding_table"]["embedding"].spec == P(None, "fsdp")
    assert shardings["pos_embed"].spec == P(None, None, "fsdp")
    sharded = nnx.merge(graphdef, jax.device_put(state, shardings))
    assert sharded.blocks.attn.qkv.kernel[...].sharding.spec == P(None, "fsdp", None)
    x = jax.device_put(nhwc(fx["x"]), sharding.batch_sharding(mesh, 4))
    out = forward(sharded, x, jnp.asarray(fx["t"]), jnp.asarray(fx["y"]))
    assert_rel_close(out, nhwc(fx["out"]), 1e-5)


def test_bad_config_and_input_raise():
    with pytest.raises(ValueError, match="num_heads"):
        LightningDiTConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="remat_policy"):
        LightningDiTConfig(remat_policy="sometimes")
    model = abstract_model(PRESETS["tiny"])  # checks happen before any computation
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((2, 8, 8, 4)), jnp.zeros(2), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="t and y"):
        model(jnp.zeros((2, 8, 8, 8)), jnp.zeros(3), jnp.zeros(2, jnp.int32))
