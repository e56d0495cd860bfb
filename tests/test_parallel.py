"""One code path from one device to many: both trainers' `run` on 1 device, on data=8 (DP) and on
data=2 x fsdp=4 (FSDP) of the 8 fake CPU devices end with the same weights, up to float32 rounding.

Tolerance, per weight array (`_assert_same_weights`):

    max |a - b|  <=  RTOL * max |a|  +  ADAM_REL * lr * steps

* RTOL = 1e-6 (~8 float32 ulps of the array's largest entry): the meshes sum over the batch in
  other orders (per-device partial sums, then an all-reduce), so every reduction rounds
  differently.
* ADAM_REL * lr per step: Adam moves a weight by lr * m / (sqrt(v) + eps), about lr * sign(g)
  where |g| >> eps, so a gradient's *relative* rounding error reaches the weight times lr.
  Gradients that are small differences of large terms carry relative errors of up to ~3e-5
  (measured: LightningDiT's zero-initialised adaLN kernels); ADAM_REL = 1e-4. A sharding bug (a
  missing all-reduce, per-device batch statistics) changes gradients by O(1) and weights by
  O(lr), 10^4 times the tolerance.

VA-VAE needs one more setting. Some of its weights have an exact gradient of zero: biases ahead
of a GroupNorm with one channel per group (32 channels in 32 groups: a per-channel shift is
normalised away) and attention key biases (softmax ignores a constant). Their computed gradient
is rounding noise, ~1e-6 at a gradient norm ~1e3 (the pixel losses are sums over pixels): far
above Adam's eps = 1e-8, so Adam turns it into steps of +-lr of random sign, which differ between
meshes (measured: up to 2 lr per step, on 1 device vs 8), as they would between two compilers.
The test runs with optim.eps = 1: a noise-only weight then moves by ~1e-6 lr, and where |g| < eps
a weight's error is lr * |dg| / eps with absolute rounding errors |dg| of ~1e-5 here, inside
ADAM_REL * lr; the weights still move by O(lr) wherever |g| is O(1) or more.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from tests.test_lightningdit_train import DIT_TRAINER_GROUP, write_latents
from tests.test_lightningdit_train import tiny_config as dit_tiny_config
from tests.test_vavae_train import VAVAE_TRAINER_GROUP
from tests.test_vavae_train import tiny_config as vae_tiny_config

RTOL = 1e-6
ADAM_REL = 1e-4

# name: (mesh.data, mesh.fsdp, mesh.num_devices, sharding)
MESHES = {
    "one": (1, 1, 1, "dp"),
    "dp": (8, 1, -1, "dp"),
    "fsdp": (2, 4, -1, "fsdp"),
}


def _run_on_meshes(run, config, tmp_path, done=None) -> dict[str, dict]:
    """`run(config)` once per mesh, from the same seed and data (one process: same batches).
    `done`: {mesh name: (config, result)} of runs made before (a session fixture), taken as
    they are where their config is the one this mesh would run."""
    out = {}
    for name, (data, fsdp, num_devices, strategy) in MESHES.items():
        c = config.copy_and_resolve_references()
        c.mesh.update(dict(data=data, fsdp=fsdp, num_devices=num_devices))
        c.sharding = strategy
        if done and name in done:
            done_config, out[name] = done[name]
            assert done_config.to_dict() == c.to_dict(), name
        else:
            out[name] = run(c, str(tmp_path / name))
        assert out[name]["step"] == config.total_steps
    return out


def _value(x):
    return x.get_value() if isinstance(x, nnx.Variable) else x


def _assert_same_weights(ref, other, *, atol: float, what: str) -> float:
    """Per array: max|a - b| <= RTOL max|a| + atol. Returns the largest used fraction of it."""
    a_leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(ref))
    b_leaves = jax.tree.leaves(jax.device_get(other))
    assert len(a_leaves) == len(b_leaves) > 0
    worst = 0.0
    for (path, a), b in zip(a_leaves, b_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.shape == b.shape and a.dtype == b.dtype
        diff = float(np.abs(a - b).max())
        tol = RTOL * float(np.abs(a).max()) + atol
        assert diff <= tol, f"{what}{jax.tree_util.keystr(path)}: max|diff| {diff:.3g} > {tol:.3g}"
        worst = max(worst, diff / tol)
    return worst


def _assert_mesh_and_sharding(results, kernel_of) -> None:
    """Each run used its mesh; FSDP really splits a large kernel, DP replicates it."""
    meshes = {}
    for name, result in results.items():
        kernel = _value(kernel_of(result["state"]))
        meshes[name] = dict(kernel.sharding.mesh.shape)
        shard = kernel.addressable_shards[0].data.shape
        if name == "fsdp":
            assert "fsdp" in str(kernel.sharding.spec), kernel.sharding.spec
            assert np.prod(shard) * 4 == np.prod(kernel.shape), (shard, kernel.shape)
        else:
            assert all(axis is None for axis in kernel.sharding.spec), kernel.sharding.spec
            assert shard == kernel.shape
    assert meshes == {
        "one": {"data": 1, "fsdp": 1},
        "dp": {"data": 8, "fsdp": 1},
        "fsdp": {"data": 2, "fsdp": 4},
    }


@pytest.mark.slow
@DIT_TRAINER_GROUP
def test_lightningdit_dp_and_fsdp_equal_one_device(tmp_path):
    from lightningdit_jax import train

    write_latents(tmp_path / "latents")
    cfg = dit_tiny_config(tmp_path / "latents")
    cfg.total_steps = 3
    cfg.checkpoint_every_steps = cfg.image_every_steps = cfg.log_every_steps = 3
    results = _run_on_meshes(train.run, cfg, tmp_path)
    _assert_mesh_and_sharding(results, lambda s: s["params"]["blocks"]["attn"]["qkv"]["kernel"])
    atol = ADAM_REL * cfg.optim.lr * cfg.total_steps
    ref = results["one"]["state"]
    for name in ("dp", "fsdp"):
        state = results[name]["state"]
        used = _assert_same_weights(ref["params"], state["params"], atol=atol, what="params")
        _assert_same_weights(ref["ema"], state["ema"], atol=atol, what="ema")
        print(f"lightningdit {name}: largest difference {used:.2f} of the tolerance")


def smallest_vavae_config(sample_images_dir, **overrides):
    """tests/test_vavae_train.py's tiny config (the GAN + VF step at its smallest: 16 px, one
    level, a 2-layer discriminator) for two steps: step 0 updates the discriminator only, step 1
    the generator with the adaptive GAN weight too."""
    return vae_tiny_config(
        sample_images_dir,
        total_steps=2,
        checkpoint_every_steps=2,
        image_every_steps=2,
        log_every_steps=2,
        **overrides,
    )


@pytest.mark.slow
@VAVAE_TRAINER_GROUP
def test_vavae_dp_and_fsdp_equal_one_device(sample_images_dir, tmp_path, vavae_fsdp_run):
    from vavae_jax import train

    cfg = smallest_vavae_config(sample_images_dir)
    assert cfg.optim.eps == 1.0  # see the module docstring: weights with a zero gradient
    # The FSDP run is the session's (conftest.py), also the uninterrupted run of
    # tests/test_vavae_train.py's kill-and-resume test.
    fsdp_config, fsdp_result, _ = vavae_fsdp_run
    results = _run_on_meshes(train.run, cfg, tmp_path, done={"fsdp": (fsdp_config, fsdp_result)})
    _assert_mesh_and_sharding(
        results, lambda s: s["gen"]["autoencoder"]["decoder"]["conv_in"]["kernel"]
    )
    atol = ADAM_REL * max(cfg.optim.lr, cfg.optim.disc_lr) * cfg.total_steps
    ref = results["one"]["state"]
    for name in ("dp", "fsdp"):
        state = results[name]["state"]
        used = max(
            _assert_same_weights(ref[k], state[k], atol=atol, what=k) for k in ("gen", "disc")
        )
        # Batch-norm running statistics: means and variances of the global batch on every mesh.
        _assert_same_weights(ref["disc_stats"], state["disc_stats"], atol=0.0, what="stats")
        print(f"vavae {name}: largest difference {used:.2f} of the tolerance")
