"""Ahead-of-time compile checks: topology parsing, per-device memory of a sharded step, the CLI,
and the trainers' own `build_abstract_step` hooks.

The report tests use a stand-in of the trainers' hook: a 2-layer NNX MLP with Adam, its state
sharded by the project's logical rules over a (`data`, `fsdp`) mesh of the 8 fake CPU devices.
The hook tests at the end compile the real train steps of both trainers (small configs, and
LightningDiT XL/1 at batch 1024) from shapes only.
"""

from __future__ import annotations

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import CHEAP_COMPILE_OPTIONS, load_config
from tests.test_lightningdit_train import DIT_TRAINER_GROUP
from tests.test_vavae_train import VAVAE_TRAINER_GROUP
from vavae_jax.runtime import aot, sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMBED, HIDDEN = 256, 1024


class MLP(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.fc1 = nnx.Linear(
            EMBED, HIDDEN, kernel_init=sharding.partitioned(init, ("embed", "mlp")), rngs=rngs
        )
        self.fc2 = nnx.Linear(
            HIDDEN, EMBED, kernel_init=sharding.partitioned(init, ("mlp", "embed")), rngs=rngs
        )

    def __call__(self, x):  # [B, EMBED] -> [B, EMBED]
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class TrainState(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.model = MLP(rngs=rngs)
        self.optimizer = nnx.Optimizer(self.model, optax.adam(1e-3), wrt=nnx.Param)


def build_abstract_step(config, mesh):
    """The hook the trainers expose: (fn, abstract_args, in_shardings, out_shardings, donate)."""
    abstract = nnx.eval_shape(lambda: TrainState(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    state_sh = sharding.state_shardings(state, mesh, config.sharding)
    batch_sh = sharding.batch_sharding(mesh, 2)
    batch = jax.ShapeDtypeStruct((config.global_batch_size, EMBED), jnp.float32)

    def step(state, x):
        ts = nnx.merge(graphdef, state)

        def loss_fn(model):
            return jnp.mean((model(x) - x) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(ts.model)
        ts.optimizer.update(ts.model, grads)
        return nnx.state(ts), {"train/loss": loss}

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return (
        step,
        (state, batch),
        (state_sh, batch_sh),
        (state_sh, {"train/loss": replicated}),
        (0,),
    )


def _config(strategy: str, batch: int = 64) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(trainer="test", sharding=strategy, global_batch_size=batch, mesh=dict(data=-1, fsdp=2))
    )


def _state_bytes() -> int:
    abstract = nnx.eval_shape(lambda: TrainState(rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))


# ----------------------------------------------------------------------------------------------
# Topology strings
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "accelerator, name, kwargs",
    [
        ("v5litepod-64", "v5e:8x8", {}),
        ("v5e-256", "v5e:16x16", {}),
        ("v5e-8", "v5e:2x4", {"chips_per_host_bounds": (2, 4, 1)}),
        ("v5e-4", "v5e:2x2", {"chips_per_host_bounds": (2, 2, 1)}),
        ("v6e-64", "v6e:8x8", {"chip_config_name": "megachip_tccontrol"}),
        ("v4-8", "v4:2x2x1", {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1)}),
        ("v4-32", "v4:2x2x4", {"chip_config_name": "megacore"}),
        ("v4-128", "v4:4x4x4", {"chip_config_name": "megacore"}),
        ("v5p-256", "v5p:4x4x8", {"chip_config_name": "megachip_tccontrol"}),
    ],
)
def test_tpu_accelerator_types_map_to_libtpu_topologies(accelerator, name, kwargs):
    assert aot.tpu_topology(accelerator) == (name, kwargs)


def test_parse_topology():
    assert aot.parse_topology("cpu:8") == aot.TopologySpec("cpu", 8)
    assert aot.parse_topology("gpu:8") == aot.TopologySpec("gpu", 8)
    spec = aot.parse_topology("tpu:v5e-64")
    assert (spec.platform, spec.num_devices, spec.tpu_name) == ("tpu", 64, "v5e:8x8")
    assert aot.parse_topology("tpu:v4-32").num_devices == 16  # 32 TensorCores = 16 chips
    assert aot.parse_topology("tpu:v5e:4x8") == aot.TopologySpec("tpu", None, "v5e:4x8")
    for bad in ("tpu:v5e-48", "tpu:v9-8", "gpu:0", "h100:8", "cpu:x", "tpu:v4-7"):
        with pytest.raises(ValueError):
            aot.parse_topology(bad)


def test_cpu_mesh_and_errors():
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=2)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        aot.abstract_mesh_for("cpu:64")
    with pytest.raises(ValueError, match="GPU target config"):
        aot.abstract_mesh_for("gpu:8")


# ----------------------------------------------------------------------------------------------
# compile_report
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reports():
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=2)
    out = {}
    for strategy in ("dp", "fsdp"):
        fn, args, in_sh, out_sh, donate = build_abstract_step(_config(strategy), mesh)
        out[strategy] = aot.compile_report(fn, args, in_sh, out_sh, donate)
    return out


def test_fsdp_halves_the_state_per_device(reports):
    dp, fsdp = reports["dp"], reports["fsdp"]
    batch_bytes = 64 * EMBED * 4 // 8  # the batch is split over all 8 devices in both
    state = _state_bytes()
    # Replicated: every device holds the whole state (params, Adam mu and nu, step count).
    assert dp["argument_bytes"] == dp["argument_bytes_from_shardings"] == state + batch_bytes
    # FSDP over 2: every weight has an `embed` axis, split in two; the Adam count stays whole.
    assert fsdp["argument_bytes"] == fsdp["argument_bytes_from_shardings"]
    state_fsdp = fsdp["argument_bytes"] - batch_bytes
    assert abs(state_fsdp / state - 0.5) < 0.01, (state_fsdp, state)
    # The state is donated: outputs reuse the argument buffers.
    assert fsdp["alias_bytes"] >= state_fsdp - 64


def test_report_fields_and_flops(reports):
    r = reports["dp"]
    assert (r["platform"], r["num_devices"]) == ("cpu", 8)
    assert r["total_bytes"] == (
        r["argument_bytes"]
        + r["output_bytes"]
        - r["alias_bytes"]
        + r["temp_bytes"]
        + r["generated_code_bytes"]
    )
    assert r["hbm_bytes"] is None and r["fits"] is None
    # Forward + backward of two matmuls on the 8 rows of each device: about 3 x 2 x 2 x B E H.
    matmul = 2 * (64 // 8) * EMBED * HIDDEN
    assert 5 * matmul < r["flops_per_device"] < 8 * matmul
    assert r["flops_loops_counted_once"] is False
    text = aot.format_report(r)
    assert "per device" in text and "unknown" in text


def test_flops_of_loops_are_flagged():
    """XLA counts a while loop's body once: a scan over 10 layers reports one layer's FLOPs."""
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=1)
    batch_sh = sharding.batch_sharding(mesh, 2)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def layers(x, w):  # x [B, E], w [10, E, E]
        return jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w)[0]

    x = jax.ShapeDtypeStruct((64, EMBED), jnp.float32)
    w = jax.ShapeDtypeStruct((10, EMBED, EMBED), jnp.float32)
    r = aot.compile_report(layers, (x, w), (batch_sh, rep), batch_sh)
    one_layer = 2 * (64 // 8) * EMBED * EMBED
    assert r["flops_loops_counted_once"] is True
    assert one_layer <= r["flops_per_device"] < 2 * one_layer
    assert "lower bound" in aot.format_report(r)


def test_fits_against_given_memory():
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=2)
    fn, args, in_sh, out_sh, donate = build_abstract_step(_config("fsdp", batch=16), mesh)
    small = aot.compile_report(fn, args, in_sh, out_sh, donate, hbm_bytes=1024)
    assert small["fits"] is False and "DOES NOT FIT" in aot.format_report(small)


# ----------------------------------------------------------------------------------------------
# aot.check_config: launch/compile_check.py's path
# ----------------------------------------------------------------------------------------------
def test_check_config_runs_a_hook(tmp_path):
    config = _config("fsdp")
    report = aot.check_config(config, "cpu:8", build_abstract_step, global_batch=128)
    assert report["global_batch_size"] == 128 and report["mesh"] == {"data": 4, "fsdp": 2}
    assert report["topology"] == "cpu:8" and report["sharding"] == "fsdp"
    assert config.global_batch_size == 64  # the caller's config is left alone
    with pytest.raises(ValueError, match="divisible"):
        aot.check_config(config, "cpu:8", build_abstract_step, global_batch=12)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_v5e_64_compile_from_shapes():
    """Runs where libtpu is installed (pip install libtpu): a compile for 64 v5e chips on CPU."""
    mesh = aot.abstract_mesh_for("tpu:v5e-64", data=-1, fsdp=8)
    assert mesh.devices.size == 64 and mesh.devices.flat[0].device_kind == "TPU v5 lite"
    fn, args, in_sh, out_sh, donate = build_abstract_step(_config("fsdp", batch=256), mesh)
    r = aot.compile_report(fn, args, in_sh, out_sh, donate)
    assert r["platform"] == "tpu" and r["num_devices"] == 64 and r["fits"] is True
    # TPU layouts pad small arrays (the scalar Adam counts) to tiles: a little above the shards.
    assert r["argument_bytes"] == pytest.approx(r["argument_bytes_from_shardings"], rel=0.01)
    assert r["hbm_bytes"] == 16 * aot.GiB
    assert np.isfinite(r["flops_per_device"]) and r["flops_per_device"] > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed")
def test_tpu_compiler_refusing_a_program_is_a_report():
    mesh = aot.abstract_mesh_for("tpu:v5e-64", data=-1, fsdp=8)
    batch = 64 * 2**22  # 4M rows per device: ~16 GiB of activations in the hidden layer alone
    fn, args, in_sh, out_sh, donate = build_abstract_step(_config("fsdp", batch=batch), mesh)
    r = aot.compile_report(fn, args, in_sh, out_sh, donate)
    assert r["fits"] is False and r["total_bytes"] is None and "RESOURCE_EXHAUSTED" in r["error"]
    assert r["temp_bytes"] > r["hbm_available_bytes"] > 15 * aot.GiB
    assert "DOES NOT FIT" in aot.format_report(r)


# ----------------------------------------------------------------------------------------------
# The trainers' hooks: their real steps, from shapes
# ----------------------------------------------------------------------------------------------
TRAINER_PACKAGES = {"lightningdit": "lightningdit_jax", "vavae": "vavae_jax"}
MEMORY_FIELDS = (
    "argument_bytes",
    "output_bytes",
    "alias_bytes",
    "temp_bytes",
    "generated_code_bytes",
    "total_bytes",
)


def _trainer_config(trainer: str, strategy: str) -> ml_collections.ConfigDict:
    """The trainer's tiny test config (tests/test_lightningdit_train.py, tests/test_parallel.py)
    on (data=8) for "dp" or (data=2, fsdp=4) for "fsdp": the steps the trainer tests run on these
    meshes, so that one compile serves both (the shared compilation cache)."""
    if trainer == "lightningdit":
        from tests.test_lightningdit_train import tiny_config

        config = tiny_config(ROOT / "no-such-folder")  # the hook reads no latents
    else:
        from tests.test_parallel import smallest_vavae_config

        config = smallest_vavae_config(ROOT / "no-such-folder")  # the hook reads no images
    config.sharding = strategy
    config.mesh.update(dict(data=-1, fsdp=4 if strategy == "fsdp" else 1))
    return config


def _state_bytes_per_device(abstract_state) -> int:
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
        for x in jax.tree.leaves(abstract_state)
    )


def _new_live_arrays(before: set[int]) -> list:
    return [a for a in jax.live_arrays() if id(a) not in before]


@pytest.mark.parametrize(
    "trainer",
    [
        pytest.param("lightningdit", marks=DIT_TRAINER_GROUP),
        pytest.param("vavae", marks=[pytest.mark.slow, VAVAE_TRAINER_GROUP]),
    ],
)
def test_trainer_hook_compiles_the_real_step(trainer):
    """launch/compile_check.py's path: config -> mesh -> the trainer's hook -> compile report."""
    hook = importlib.import_module(f"{TRAINER_PACKAGES[trainer]}.train").build_abstract_step
    reports, state_bytes = {}, {}
    for strategy in ("dp", "fsdp"):
        config = _trainer_config(trainer, strategy)
        mesh = aot.abstract_mesh_for("cpu:8", data=config.mesh.data, fsdp=config.mesh.fsdp)
        before = {id(a) for a in jax.live_arrays()}
        fn, args, in_sh, out_sh, donate = hook(config, mesh)
        assert not _new_live_arrays(before)  # shapes only: nothing allocated
        assert donate == (0,)
        for x in jax.tree.leaves(args):
            assert isinstance(x, jax.ShapeDtypeStruct) and x.sharding.mesh == mesh
        state_bytes[strategy] = _state_bytes_per_device(args[0])
        reports[strategy] = aot.check_config(config, "cpu:8", hook)
    dp, fsdp = reports["dp"], reports["fsdp"]
    assert (dp["mesh"], fsdp["mesh"]) == ({"data": 8, "fsdp": 1}, {"data": 2, "fsdp": 4})
    for r in (dp, fsdp):
        assert all(isinstance(r[k], int) and r[k] >= 0 for k in MEMORY_FIELDS), r
        assert r["total_bytes"] > 0 and r["flops_per_device"] > 0
        # jit drops arguments the step never reads (the teacher's 64-float mask token).
        assert 0 <= r["argument_bytes_from_shardings"] - r["argument_bytes"] <= 256
        assert "per device" in aot.format_report(r)
    # The state (weights, Adam moments, EMA) is donated: its buffers are reused for the output.
    assert dp["alias_bytes"] >= state_bytes["dp"] and fsdp["alias_bytes"] >= state_bytes["fsdp"]
    # FSDP splits every weight with an `embed` (LightningDiT) or `conv_out` (VA-VAE) axis over
    # fsdp=4; what has none (biases and norms over other axes, the frozen LPIPS and teacher,
    # the batch split 8 ways in both) stays as it is.
    assert fsdp["argument_bytes"] < dp["argument_bytes"]
    saved = dp["argument_bytes"] - fsdp["argument_bytes"]
    assert saved == state_bytes["dp"] - state_bytes["fsdp"]
    assert state_bytes["fsdp"] < 0.4 * state_bytes["dp"], state_bytes


@pytest.mark.slow
def test_lightningdit_xl1_full_size_compiles_from_shapes():
    """XL/1 at the paper's global batch 1024 with fsdp=8 on 8 CPU devices: nothing allocated,
    the ~10 GiB of state (weights, EMA, two Adam moments) split eight ways."""
    from lightningdit_jax import train

    config = load_config("lightningdit_xl_vavae_f16d32.py")  # XL/1, global batch 1024
    config.mesh.update(dict(data=-1, fsdp=8))
    assert (config.model.preset, config.global_batch_size) == ("XL/1", 1024)
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=8)
    before = {id(a) for a in jax.live_arrays()}
    fn, args, in_sh, out_sh, donate = train.build_abstract_step(config, mesh)
    assert not _new_live_arrays(before)
    state, batch = args[0], args[1]
    assert batch["latent"].shape == (1024, 16, 16, 32)  # f16d32 latents of 256 px images
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
    assert 670e6 < num_params < 680e6  # LightningDiT-XL/1: 675M
    assert total == pytest.approx(4 * 4 * num_params, rel=1e-3)  # params, EMA, mu, nu (f32)
    # Weights without an embed axis (a few biases and norms) stay whole: a little above 1/8.
    assert total / 8 < _state_bytes_per_device(state) < 1.01 * total / 8
    # LLVM at -O0: the memory and FLOP figures are XLA's, from before the code generation.
    r = aot.compile_report(fn, args, in_sh, out_sh, donate, compiler_options=CHEAP_COMPILE_OPTIONS)
    assert r["compiler_options"] == CHEAP_COMPILE_OPTIONS
    assert r["argument_bytes"] == r["argument_bytes_from_shardings"]
    assert r["argument_bytes"] < 1.01 * total / 8 + 1024 * 16 * 16 * 32 * 4 // 8 + 1024
    assert r["alias_bytes"] >= _state_bytes_per_device(state)
    assert all(r[k] >= 0 for k in MEMORY_FIELDS) and r["flops_loops_counted_once"]


@pytest.mark.slow
def test_vavae_hook_reads_no_weights():
    """The full-size VA-VAE hook takes the teacher's shapes from teacher.preset (dinov2-large)
    and LPIPS's from its class: no download, no file, although lpips.path is empty and the
    teacher a hub id, which `run` would refuse or download."""
    from vavae_jax import train

    config = load_config("vavae_f16d32.py")
    assert config.teacher.path == "facebook/dinov2-large" and config.lpips.path == ""
    mesh = aot.abstract_mesh_for("cpu:8", data=-1, fsdp=1)
    before = {id(a) for a in jax.live_arrays()}
    _, args, _, _, _ = train.build_abstract_step(config, mesh)
    assert not _new_live_arrays(before)
    frozen = args[1]
    teacher_params = sum(math.prod(x.shape) for x in jax.tree.leaves(frozen["teacher"]))
    assert 300e6 < teacher_params < 310e6  # DINOv2 ViT-L/14: 304M
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(frozen["lpips"])) > 14e6  # VGG16
    assert args[2]["image"].shape == (256, 256, 256, 3)
