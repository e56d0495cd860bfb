"""launch/bench/roofline.py and lightningdit_jax.costs: the GEMM list is the program's, the
traffic floor and sampler counts hold, the command's targets follow a reference measurement."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import costs
from lightningdit_jax.model import PRESETS, LightningDiT, abstract_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROOFLINE = str(ROOT / "launch/bench/roofline.py")

_TYPES = re.compile(r":\s*\((tensor<[^>]*>),\s*(tensor<[^>]*>)\)\s*->\s*(tensor<[^>]*>)")


def _shape(t: str) -> list[int]:
    return [int(x) for x in t[len("tensor<") :].split("x")[:-1]]


def _lowered_products(text: str) -> tuple[list[float], int, int]:
    """(FLOPs of each dot without batch dimensions, number of batched dots, of convolutions)
    in a lowered StableHLO module."""
    flops, batched, convs = [], 0, 0
    for line in text.splitlines():
        if "stablehlo.convolution" in line:
            convs += 1
        if "stablehlo.dot_general" not in line:
            continue
        if "batching_dims" in line:  # attention's score and value products
            batched += 1
            continue
        contract = re.search(r"contracting_dims = \[([\d, ]*)\] x", line).group(1)
        lhs, _, out = _TYPES.search(line).groups()
        k = np.prod([_shape(lhs)[int(i)] for i in contract.split(",")])
        flops.append(2.0 * float(np.prod(_shape(out))) * float(k))
    return sorted(flops), batched, convs


def _lower(cfg, batch: int, train: bool) -> str:
    model = LightningDiT(cfg, rngs=nnx.Rngs(0))
    g, params, rest = nnx.split(model, nnx.Param, ...)
    s = cfg.input_size
    x = jnp.zeros((batch, s, s, cfg.in_channels), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)

    def forward(params):
        return nnx.merge(g, params, rest)(x, t, y)

    if train:
        return jax.jit(jax.grad(lambda p: jnp.sum(forward(p) ** 2))).lower(params).as_text()
    return jax.jit(forward).lower(params).as_text()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("swiglu", [True, False])
def test_gemm_plan_is_the_programs(train, swiglu):
    """Every matmul of the lowered forward / gradient program, no more and no fewer, with the
    same sizes (FLOPs of each product): the floor's GEMM time misses nothing."""
    cfg = dataclasses.replace(
        PRESETS["tiny"], scan_layers=False, dtype="bfloat16", use_swiglu=swiglu, depth=3
    )
    batch = 2
    plan = costs.gemms(cfg, batch, train)
    want = sorted(
        2.0 * g.m * g.k * g.n
        for g in plan
        if not g.name.startswith("embed.conv")
        for _ in range(g.count)
    )
    got, batched, convs = _lowered_products(_lower(cfg, batch, train))
    assert got == want
    # the patch embedding: its forward, and in training its weight gradient, are convolutions
    assert convs == (2 if train else 1)
    assert sum(g.count for g in plan if g.name.startswith("embed.conv")) == convs
    # attention: 2 batched products per block forward (XLA's path on the CPU), 4 more backward
    assert batched == cfg.depth * (6 if train else 2)
    b, t, n, h = costs.attention_shape(cfg, batch)
    assert (b, t, n, h) == (batch, cfg.num_patches, cfg.num_heads, cfg.head_dim)


def test_gemm_flops_match_the_benchmarks_count():
    """XL/1: the plan's forward matmul FLOPs equal `forward_flops`, the analytic count of the
    MFU figures of BENCHMARKS.md, with attention's products added."""
    cfg = PRESETS["XL/1"]
    plan = sum(g.flops for g in costs.gemms(cfg, 1, train=False))
    attn = costs.attention_flops(cfg, 1, train=False)
    # the benchmark's count leaves out the timestep MLP, the final layer's adaLN and its output
    # projection (0.02% together)
    extra = 2.0 * (256 * 1152 + 1152 * 1152 + 1152 * 2304 + 256 * 1152 * 32)
    assert plan + attn - extra == pytest.approx(costs.forward_flops(cfg), rel=1e-12)


def test_traffic_floor_items():
    """The optimizer term uses the model's own parameter count; activation terms scale with the
    batch; a train step moves more than its forward; GELU and no-RoPE variants drop their items."""
    cfg = dataclasses.replace(PRESETS["XL/1"], dtype="bfloat16")
    n = sum(
        int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model(cfg), nnx.Param))
    )
    assert costs.trainable_params(cfg) == n
    items = costs.traffic(cfg, 64, train=True, n_params=n)
    opt = [v for k, v in items.items() if k.startswith("optimizer")]
    assert opt == [34.0 * n]
    fwd64 = sum(costs.traffic(cfg, 64, train=False).values())
    fwd128 = sum(costs.traffic(cfg, 128, train=False).values())
    assert fwd128 == pytest.approx(2 * fwd64)
    assert sum(items.values()) > fwd64 + 34.0 * n
    # XL/1 per token and block: forward 16d + 6n (bf16 boundary tensors) + 8d (float32 stream);
    # backward 20d + 10n + 16d; d = 1152, n = 3072
    per_token_block = (sum(items.values()) - 34.0 * n) / (64 * 256 * 28)
    assert per_token_block == pytest.approx(60 * 1152 + 16 * 3072, rel=0.01)
    plain = dataclasses.replace(cfg, use_rope=False, use_swiglu=False)
    keys = costs.traffic(plain, 64, train=True, n_params=n).keys()
    assert not any("q, k" in k or "dq" in k or "SwiGLU" in k for k in keys)
    assert any("GELU" in k for k in keys)


def test_sampler_evaluations_follow_the_time_grid():
    """Guided calls are the Euler steps whose shifted time is >= the interval start, counted on
    torch.linspace's grid recomputed in numpy."""
    steps, shift, start = 250, 0.3, 0.1
    t = np.linspace(0.0, 1.0, steps, dtype=np.float64)
    t = shift * t / (1 + (shift - 1) * t)
    want = int(np.sum(t[: steps - 1] >= start))
    guided, plain = costs.sampler_evaluations(steps, shift, start)
    assert (guided, plain) == (want, steps - 1 - want)
    assert 0 < plain < guided
    assert costs.sampler_evaluations(steps, shift, 0.0) == (steps - 1, 0)


def _reference_json(path, xl=500.0, b=2500.0, cfg_fwd_s=0.1):
    results = [
        dict(case="reference_train_XL/1", batch=64, img_per_s=xl),
        dict(case="reference_train_B/1", batch=256, img_per_s=b),
        dict(
            case="reference_cfg_forward_XL/1",
            batch=128,
            img_per_s_at_250_steps=128 / (250 * cfg_fwd_s),
        ),
    ]
    path.write_text(json.dumps(dict(meta=dict(device="NVIDIA H200"), results=results)))
    return path


def test_dry_run_cli(tmp_path):
    """The command prints the plan on a CPU, takes its targets from a bench_reference.py
    measurement (a missing case is an error naming it) and refuses to measure without a GPU."""
    out = tmp_path / "r.json"
    ref = _reference_json(tmp_path / "ref.json")
    cmd = [sys.executable, ROOFLINE, "--train=B/1,4", "--forward=B/1,8;B/1,4", "--vae_train="]
    r = subprocess.run(
        [*cmd, "--dry_run", "--fp8", f"--reference_json={ref}", f"--out={out}"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "least other traffic" in r.stdout and "NVIDIA H200" in r.stdout
    data = json.loads(out.read_text())
    bf16 = {"B/1 train b4", "B/1 forward b8", "B/1 forward b4"}
    assert set(data["paths"]) == bf16 | {f"{p} fp8" for p in bf16}
    assert data["sampler"]["guided_calls"] + data["sampler"]["conditional_calls"] == 249
    targets = data["targets"]
    assert targets["XL/1 train b64"]["target_ms_same_session"] == pytest.approx(64 / 800 * 1e3)
    assert targets["B/1 train b256"]["target_ms_same_session"] == pytest.approx(256 / 3750 * 1e3)
    assert targets["XL/1 sample b128"]["target_s_same_session"] == pytest.approx(25.0 / 1.5)
    # issue 19's FP8 targets: 1.6x / 1.5x / 1.7x the reference's bf16
    assert targets["XL/1 sample b128 fp8"]["target_s_same_session"] == pytest.approx(25.0 / 1.7)
    assert targets["XL/1 train b64 fp8"]["ratio"] == 1.6
    # the design figures stay the paper's: 64 images at 1.6 x 407 img/s
    assert targets["XL/1 train b64"]["target_ms_design"] == pytest.approx(64 / (1.6 * 407) * 1e3)
    bad = tmp_path / "bad.json"
    bad.write_text(ref.read_text().replace("reference_train_B/1", "reference_train_B/2"))
    r = subprocess.run(
        [*cmd, "--dry_run", f"--reference_json={bad}"], capture_output=True, text=True
    )
    assert r.returncode != 0 and "reference_train_B/1" in r.stderr
    if jax.default_backend() != "gpu":
        r = subprocess.run([*cmd, f"--out={out}"], capture_output=True, text=True)
        assert r.returncode != 0 and "needs a GPU" in r.stderr


def test_fp8_floor_times_the_blocks_linear_layers_in_float8():
    """roofline --fp8: the products `precision="fp8"` runs in float8 are the blocks' four linear
    layers, forward and both gradients, with e5m2 on the gradient's side."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("roofline", ROOFLINE)
    roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roofline)
    cfg = dataclasses.replace(PRESETS["XL/1"], dtype="bfloat16")
    e4, e5 = jnp.float8_e4m3fn, jnp.float8_e5m2
    got = {g.name: roofline.fp8_operand_dtypes(g) for g in costs.gemms(cfg, 64, train=True)}
    f8 = {k: v for k, v in got.items() if v is not None}
    layers = ("block.qkv", "block.proj", "block.w12", "block.w3")
    assert set(f8) == {f"{n}.{p}" for n in layers for p in ("fwd", "dx", "dw")}
    assert f8["block.qkv.fwd"] == (e4, e4) and f8["block.w3.dx"] == (e5, e4)
    assert f8["block.proj.dw"] == (e4, e5)


def _conv(x, w):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_op_census_counts_products_and_the_least_traffic_around_them():
    """Exact bytes on programs small enough to count by hand: a product's output read once by
    the activation after it, an activation written once for the product that reads it, inputs
    and weights free, layout-only operations and jit boundaries transparent."""
    from vavae_jax.costs import op_census

    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    w1 = jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)
    w2 = jax.ShapeDtypeStruct((3, 3, 4, 5), jnp.float32)
    act = 2 * 8 * 8 * 4 * 4  # bytes of conv 1's output, float32

    one = op_census(lambda x, w: jnp.sum(jax.nn.silu(_conv(x, w))), x, w1)
    assert (one.calls, one.product_reads, one.operand_writes) == (1, act, 0)
    assert one.ops[0].flops == 2.0 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    twice = op_census(  # two readers, one through a reshape: still read once
        lambda x, w: jnp.sum(jax.nn.silu(y := _conv(x, w)) * jnp.tanh(y.reshape(y.shape))), x, w1
    )
    assert (twice.calls, twice.product_reads, twice.operand_writes) == (1, act, 0)

    @jax.jit  # a call boundary, followed
    def block(h, w):
        return jax.nn.silu(h).reshape(h.shape).astype(jnp.float32)  # layout ops pass through

    two = op_census(lambda x, w1, w2: _conv(block(_conv(x, w1), w2), w2), x, w1, w2)
    assert (two.calls, two.product_reads, two.operand_writes) == (2, act, act)
    assert len(two.ops) == 2

    # The gradient: 2 forward convolutions, 3 backward ones (conv 2's data gradient, both
    # weight gradients); the input gradient of conv 1 is not asked for.
    def loss(w1, w2, x):
        return jnp.sum(_conv(jax.nn.silu(_conv(x, w1)), w2) ** 2)

    grad = op_census(jax.grad(loss, argnums=(0, 1)), w1, w2, x)
    assert grad.calls == 5
    assert {op.primitive for op in grad.ops} == {"conv_general_dilated"}

    dots = op_census(lambda a, b: jnp.tanh(a @ b), jax.ShapeDtypeStruct((6, 7), jnp.bfloat16),
                     jax.ShapeDtypeStruct((7, 9), jnp.bfloat16))  # fmt: skip
    assert (dots.calls, dots.product_reads) == (1, 6 * 9 * 2)
    assert dots.ops[0].flops == 2.0 * 6 * 9 * 7


@pytest.mark.slow  # a subprocess tracing the whole VA-VAE step
def test_vavae_step_census_and_dry_run(tmp_path):
    """The real VA-VAE step's census (the small config): every network's products are there
    (teacher matrices, autoencoder / LPIPS / PatchGAN convolutions, forward and backward), and
    the roofline's dry run writes its plan."""
    out = tmp_path / "vae.json"
    cmd = [sys.executable, ROOFLINE, "--dry_run", "--train=", "--forward=", "--vae_train=4",
           f"--vae_config={ROOT / 'configs/vavae_f16d32.py'}:small", f"--out={out}"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["vae_train"]
    assert row["batch"] == 4 and row["product_calls"] >= 40
    assert sum(o["count"] for o in row["ops"]) == row["product_calls"]
    kinds = {o["op"].split()[0] for o in row["ops"]}
    assert kinds == {"conv_general_dilated", "dot_general"}
    items = row["traffic_items_gb"]
    assert items["adam_generator"] > items["adam_discriminator"] > 0
    assert items["product_outputs_read"] > 0 and items["computed_operands_written"] > 0
    assert "least other traffic" in r.stdout
