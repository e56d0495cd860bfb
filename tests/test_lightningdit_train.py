"""The LightningDiT trainer and its latent data: records, stats, resume, normalisation."""

import os

import jax
import numpy as np
import pytest

from lightningdit_jax import data as data_lib
from lightningdit_jax import train
from tests.conftest import load_config

DIT_CONFIG = "lightningdit_xl_vavae_f16d32.py"
# The LightningDiT trainer runs of every file (the tiny config on tests/test_parallel.py's meshes)
# run one after another in one xdist worker: one compile per mesh, the rest from the cache.
DIT_TRAINER_GROUP = pytest.mark.xdist_group("lightningdit_trainer")


def write_latents(directory, n=32, shape=(8, 8, 8), num_classes=10, seed=0):
    """Random latents [n, 2, h, w, C] with a per-channel offset and scale, in two shards."""
    rs = np.random.RandomState(seed)
    c = shape[-1]
    z = (rs.randn(n, 2, *shape) * np.linspace(0.5, 2, c) + np.arange(c)).astype(np.float32)
    labels = (np.arange(n) % num_classes).astype(np.int32)
    os.makedirs(directory, exist_ok=True)
    shards, acc = [], data_lib.StatsAccumulator(c)
    for i, sl in enumerate((slice(0, n // 2), slice(n // 2, n))):
        name = f"latents-{i:05d}.array_record"
        data_lib.write_shard(os.path.join(directory, name), z[sl], labels[sl])
        shards.append({"file": name, "count": int(z[sl].shape[0])})
        acc.update(z[sl, 0])
    data_lib.save_index(
        str(directory),
        {"shape": [2, *shape], "dtype": "float32", "num_classes": num_classes, "shards": shards},
    )
    mean, std = acc.result()
    data_lib.save_stats(os.path.join(directory, data_lib.STATS_FILE), mean, std)
    return z, labels


def tiny_config(data_dir):
    """The 8x8x8 latents of write_latents. The mesh is tests/test_parallel.py's FSDP one: the
    trainer tests that run this config compile one step and one init between them (the shared
    compilation cache)."""
    c = load_config(DIT_CONFIG, "tiny,small")
    c.data.data_dir = str(data_dir)
    c.global_batch_size = 8
    c.total_steps = 4
    c.mesh.update(dict(data=2, fsdp=4))
    c.sharding = "fsdp"
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.image_every_steps = 4
    c.grid_sample_steps = 3
    c.num_grid_images = 2
    c.progress_bar = False
    c.tokenizer.path = "/some/vavae_export"
    return c


def test_records_and_stats(tmp_path):
    z, labels = write_latents(tmp_path)
    got_z, got_y = data_lib.read_shard(str(tmp_path / "latents-00001.array_record"), z.shape[1:])
    np.testing.assert_array_equal(got_z, z[16:])
    np.testing.assert_array_equal(got_y, labels[16:])
    stats = data_lib.load_stats(str(tmp_path))
    # Reference: mean / unbiased std over [N, h, w] of the unflipped latents, per channel.
    ref = z[:, 0].astype(np.float64)
    np.testing.assert_allclose(stats["mean"], ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], ref.std(axis=(0, 1, 2), ddof=1), rtol=1e-6)


def test_pipeline_normalises_and_picks_flips(tmp_path):
    z, labels = write_latents(tmp_path)
    cfg = tiny_config(tmp_path)
    stats = data_lib.load_stats(str(tmp_path))
    it, _ = data_lib.make_train_iterator(cfg.data, 32, seed=3, shard_index=0, shard_count=1)
    batch = next(it)
    assert batch["latent"].shape == (32, 8, 8, 8)
    raw = data_lib.denormalize(batch["latent"], stats["mean"], stats["std"])
    picked = []
    for x, y in zip(raw, batch["label"]):
        d = np.abs(z[:, :] - x[None, None]).max(axis=(2, 3, 4))  # [n, 2]
        i, which = np.unravel_index(np.argmin(d), d.shape)
        assert d[i, which] < 1e-4 and labels[i] == y
        picked.append(which)
    assert 0 < sum(picked) < len(picked)  # both the image and its flip are drawn
    # Per-host sharding: two hosts read disjoint halves.
    a, _ = data_lib.make_train_iterator(cfg.data, 16, seed=3, shard_index=0, shard_count=2)
    b, _ = data_lib.make_train_iterator(cfg.data, 16, seed=3, shard_index=1, shard_count=2)
    assert a.per_host_batch == 8
    ya, yb = next(a), next(b)
    assert not np.allclose(ya["latent"], yb["latent"])


def test_normalize_denormalize_exact_inverses():
    rs = np.random.RandomState(1)
    z = rs.randn(4, 8, 8, 32).astype(np.float32) * 3 + 1
    mean = rs.randn(32).astype(np.float32)
    std = rs.uniform(0.5, 2, 32).astype(np.float32)
    for mult in (1.0, 0.18215):
        back = data_lib.denormalize(data_lib.normalize(z, mean, std, mult), mean, std, mult)
        np.testing.assert_allclose(back, z, rtol=0, atol=2e-6 * np.abs(z).max())
        back64 = data_lib.denormalize(
            data_lib.normalize(z.astype(np.float64), mean, std, mult), mean, std, mult
        )
        np.testing.assert_allclose(back64, z, rtol=1e-12)


@pytest.mark.slow
@DIT_TRAINER_GROUP
def test_kill_and_resume_equals_uninterrupted(tmp_path):
    write_latents(tmp_path / "latents")
    cfg = tiny_config(tmp_path / "latents")
    full = train.run(cfg, str(tmp_path / "full"))
    part = train.run(cfg, str(tmp_path / "resumed"), stop_after_steps=1)
    assert part["step"] == 1
    resumed = train.run(cfg, str(tmp_path / "resumed"))
    assert resumed["step"] == full["step"] == 4
    for key in ("params", "ema", "opt"):
        a = jax.tree.leaves(jax.device_get(full["state"][key]))
        b = jax.tree.leaves(jax.device_get(resumed["state"][key]))
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # FSDP is really applied: the embed axis of the patch embedding is split over fsdp.
    kernel = full["state"]["params"]["x_embedder"]["proj"]["kernel"]
    kernel = kernel.get_value() if hasattr(kernel, "get_value") else kernel
    assert "fsdp" in str(kernel.sharding.spec)
    # The checkpoint carries the latent stats and the tokenizer reference.
    meta = train.load_meta(str(tmp_path / "full"))
    assert meta["step"] == 4
    stats = data_lib.load_stats(str(tmp_path / "latents"))
    np.testing.assert_array_equal(np.float32(meta["latent_mean"]), stats["mean"])
    np.testing.assert_array_equal(np.float32(meta["latent_std"]), stats["std"])
    assert meta["tokenizer"]["path"] == "/some/vavae_export"
    assert list((tmp_path / "full" / "samples").glob("latent_*.png"))
    # The EMA weights read back for sampling equal the trained ones.
    from vavae_jax.runtime import sharding

    ema, meta2, _ = train.load_ema_model(str(tmp_path / "full"), sharding.make_mesh(-1, 1))
    from flax import nnx

    for x, y in zip(
        jax.tree.leaves(nnx.state(ema, nnx.Param)), jax.tree.leaves(full["state"]["ema"])
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_config_variants():
    c = load_config(DIT_CONFIG)
    assert (c.model.preset, c.global_batch_size, c.total_steps) == ("XL/1", 1024, 80_000)
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.optim.weight_decay) == (2e-4, 0.9, 0.95, 0.0)
    assert c.ema.decay == 0.9999 and c.model.class_dropout_prob == 0.1
    assert load_config(DIT_CONFIG, "B/1,800ep").model.preset == "B/1"
    assert load_config(DIT_CONFIG, "800ep").sample.cfg_scale == 6.7
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(DIT_CONFIG, "XXL/1")


def test_trainer_model_takes_flash_attention_on_gpu(monkeypatch):
    """Regression: the config's attention choice reaches the model as "auto", which picks cuDNN's
    flash kernel for bf16 on a GPU (the trainer once passed None, i.e. XLA's attention that
    materialises the scores: 25% slower XL/1 steps); an empty string from older configs too."""
    from vavae_jax.runtime import attention

    for value in ("auto", ""):
        c = load_config(DIT_CONFIG)
        c.model.attention_impl = value
        mcfg = train.model_config(c, platform="gpu")
        assert mcfg.attention_impl == "auto" and mcfg.dtype == "bfloat16"
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        impl = attention.resolve(mcfg.attention_impl, mcfg.dtype, mcfg.head_dim)
        monkeypatch.undo()
        assert impl == "cudnn", (value, impl)


@pytest.mark.slow
def test_training_loss_gradient_finite_at_zero_output():
    """Regression: at initialisation the output layer is zero, so the cosine term sees a zero
    vector; its gradient must be finite (torch's cosine_similarity clamps the norm too)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lightningdit_jax import transport
    from lightningdit_jax.model import PRESETS, LightningDiT

    model = LightningDiT(PRESETS["tiny"], rngs=nnx.Rngs(0))
    gdef, params, rest = nnx.split(model, nnx.Param, ...)
    cfg = PRESETS["tiny"]
    x1 = jax.random.normal(jax.random.key(0), (2, cfg.input_size, cfg.input_size, cfg.in_channels))
    y = jnp.array([1, 2])

    def loss(p):
        return transport.training_loss(nnx.merge(gdef, p, rest), x1, y, jax.random.key(1))[0]

    grads = jax.jit(jax.grad(loss))(params)  # one compile, not one per primitive
    # Checked in numpy: eager jnp reductions would compile two programs per leaf shape.
    grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(bool(np.isfinite(g).all()) for g in grads)
    assert any(float(np.abs(g).max()) > 0 for g in grads)
    a = jnp.zeros((3, 4))
    g = jax.grad(lambda a: transport.cosine_similarity(a, jnp.ones((3, 4))).sum())(a)
    assert bool(np.isfinite(np.asarray(g)).all())
