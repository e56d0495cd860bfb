"""The public sharding helpers users call directly: `create_sharded`, `optimizer_init_sharded`."""

import dataclasses

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from lightningdit_jax import model as model_lib
from vavae_jax.runtime import sharding


def _tiny():
    return dataclasses.replace(model_lib.PRESETS["tiny"], scan_layers=True)


def test_create_sharded_places_every_weight_and_keeps_the_values():
    """Every variable comes out in the sharding its annotation and the rules give (the `embed`
    axes split 4 ways on the fsdp axis), with the values of a plain (eager) construction."""
    cfg = _tiny()
    mesh = sharding.make_mesh(2, 4)
    model = sharding.create_sharded(
        lambda: model_lib.LightningDiT(cfg, rngs=nnx.Rngs(3)), mesh, "fsdp"
    )
    state = nnx.state(model)
    expected = sharding.state_shardings(nnx.state(model_lib.abstract_model(cfg)), mesh, "fsdp")
    plain = nnx.state(model_lib.LightningDiT(cfg, rngs=nnx.Rngs(3)))
    got, want, ref = (jax.tree.leaves(t) for t in (state, expected, plain))
    assert len(got) == len(want) == len(ref)
    split = 0
    for x, sh, r in zip(got, want, ref, strict=True):
        assert x.sharding.is_equivalent_to(sh, x.ndim), (x.shape, x.sharding, sh)
        # jit-compiled vs eager initialisation: the same draws, scaled with 1-ulp differences
        np.testing.assert_allclose(np.asarray(x), np.asarray(r), rtol=1e-6, atol=1e-8)
        if x.addressable_shards[0].data.shape != x.shape:
            split += 1
            assert "fsdp" in str(sh.spec)
    # the block weights with an embed axis are split: the rules did reach the arrays
    assert split >= 5, split


def test_optimizer_init_sharded_follows_the_parameters():
    """Adam's moments are sharded like their parameters; the step count is replicated."""
    cfg = _tiny()
    mesh = sharding.make_mesh(2, 4)
    model = sharding.create_sharded(
        lambda: model_lib.LightningDiT(cfg, rngs=nnx.Rngs(0)), mesh, "fsdp"
    )
    params = nnx.state(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt = sharding.optimizer_init_sharded(tx, params, mesh)
    adam = opt[0]
    for moments in (adam.mu, adam.nu):
        for m, p in zip(jax.tree.leaves(moments), jax.tree.leaves(params), strict=True):
            assert m.shape == p.shape
            assert m.sharding.is_equivalent_to(p.sharding, p.ndim), (p.shape, m.sharding)
            assert not np.any(np.asarray(m))
    assert any(p.addressable_shards[0].data.shape != p.shape for p in jax.tree.leaves(params))
    assert adam.count.sharding.is_fully_replicated
    # one update runs with these shardings and keeps them
    grads = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), params)
    updates, opt2 = jax.jit(tx.update)(grads, opt, params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        assert u.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert int(opt2[0].count) == 1


@pytest.mark.slow
def test_import_keeps_flax_eager_sharding_and_models_build_with_it_on():
    """Importing the packages leaves flax's global eager-sharding setting alone (it used to turn
    it off process-wide), and the models still build outside a mesh with it on."""
    import subprocess
    import sys

    code = (
        "from flax import nnx\n"
        "before = nnx.using_eager_sharding()\n"
        "import lightningdit_jax, lightningdit_jax.train, vavae_jax, vavae_jax.train\n"
        "assert nnx.using_eager_sharding() == before, 'import changed eager sharding'\n"
        "nnx.use_eager_sharding(True)\n"
        "from lightningdit_jax import model as m\n"
        "from vavae_jax import model as vm, foundation\n"
        "m.LightningDiT(m.PRESETS['tiny'], rngs=nnx.Rngs(0))\n"
        "vm.AutoencoderKL(vm.AutoencoderConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1,\n"
        "    attn_resolutions=(), z_channels=4, embed_dim=4, resolution=16), rngs=nnx.Rngs(0))\n"
        "foundation.Dinov2Model(foundation.Dinov2Config(hidden_size=32, num_hidden_layers=1,\n"
        "    num_attention_heads=2), rngs=nnx.Rngs(0))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
