"""The VA-VAE training job: the step against the library, resume, overfitting, bad inputs."""

import dataclasses
import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import CHEAP_COMPILE_OPTIONS, load_config
from vavae_jax import discriminator as disc_lib
from vavae_jax import foundation, losses, train
from vavae_jax import lpips as lpips_lib
from vavae_jax.model import AutoencoderConfig
from vavae_jax.runtime import sharding
from vavae_jax.train_step import StepConfig, frozen_state, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The VA-VAE trainer tests of every file run one after another in one xdist worker (with
# `--dist loadgroup`, pyproject.toml): the first to need a step compiles it, the others read it
# from the compilation cache (two workers starting the same compile would each pay for it).
VAVAE_TRAINER_GROUP = pytest.mark.xdist_group("vavae_trainer")


def tiny_config(sample_images_dir, **overrides):
    """The real config with the small-run switch, shrunk to the GAN + VF step at its smallest for
    the test budget: 16 px, one level (16x16 latents and teacher tokens), a 2-layer
    discriminator. disc_start=1 (Lightning steps, 2 per iteration): iteration 0 updates the
    discriminator only, every later one the generator with the adaptive GAN weight too, so both
    step branches run.

    Every VA-VAE trainer test runs this config, on one of the meshes of tests/test_parallel.py
    (1 device; data=8; data=2 x fsdp=4 here), with these optimizer settings: the same program
    then compiles once per mesh for the whole suite, through the shared compilation cache (the
    tests are one xdist group: `VAVAE_TRAINER_GROUP`). optim.eps=1: see tests/test_parallel.py."""
    c = load_config("vavae_f16d32.py", "small")
    c.model.update(dict(ch=32, ch_mult=(1,), resolution=16, attn_resolutions=()))
    c.teacher.resolution = 16 * 14  # 16x16 latents <-> 16x16 teacher tokens
    c.data.update(dict(root=str(sample_images_dir), resolution=16, max_records=16))
    c.loss.update(dict(disc_ndf=16, disc_num_layers=2, disc_start=1))
    c.optim.update(dict(lr=2e-3, eps=1.0))
    c.global_batch_size = 8
    c.total_steps = 4
    c.mesh.update(dict(data=2, fsdp=4))
    c.sharding = "fsdp"
    c.checkpoint_every_steps = 2
    c.log_every_steps = 1
    c.image_every_steps = 2
    c.progress_bar = False
    for k, v in overrides.items():
        node = c
        *path, last = k.split(".")
        for p in path:
            node = node[p]
        node[last] = v
    return c


def _params(result):
    return jax.tree.map(np.asarray, jax.device_get(result["state"]["gen"]))


@pytest.mark.slow
@VAVAE_TRAINER_GROUP
def test_kill_and_resume_equals_uninterrupted(vavae_fsdp_run, tmp_path):
    # Two steps (tiny_config: step 0 updates the discriminator only, step 1 the generator with
    # the adaptive GAN weight too), checkpoints every 2: the kill after step 1 falls between
    # checkpoints and the resumed run takes the other branch of the step. The uninterrupted run
    # on the FSDP mesh is the session's (conftest.py), also the fsdp run of tests/test_parallel.py.
    cfg, full, full_dir = vavae_fsdp_run
    assert cfg.total_steps == 2 and cfg.checkpoint_every_steps == 2
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.sharding) == (2, 4, "fsdp")
    # "Killed" after 1 step (SIGTERM path: checkpoint at step 1), then resumed by the same call.
    part = train.run(cfg, str(tmp_path / "resumed"), stop_after_steps=1)
    assert part["step"] == 1
    assert (tmp_path / "resumed" / "checkpoints" / "1").is_dir()
    resumed = train.run(cfg, str(tmp_path / "resumed"))
    assert resumed["step"] == full["step"] == 2
    a, b = _params(full), _params(resumed)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    # FSDP really shards: the largest conv kernels are split over the fsdp axis.
    kernel = full["state"]["gen"]["autoencoder"]["decoder"]["conv_in"]["kernel"]
    kernel = kernel.get_value() if isinstance(kernel, nnx.Variable) else kernel
    assert "fsdp" in str(kernel.sharding.spec)
    # The job's outputs: TensorBoard events, metrics, a reconstruction grid, the config.
    logs = list((full_dir / "logs").glob("events.out.tfevents.*"))
    assert logs and logs[0].stat().st_size > 0
    assert list((full_dir / "samples").glob("recon_*.png"))
    assert (full_dir / "config.json").is_file()


# ---------------------------------------------------------------------------------------------
# The step against the library's own pure functions, computed the naive way.
# ---------------------------------------------------------------------------------------------
def _tiny_models(use_vf=True):
    """The networks are never mutated (the step and `_naive` work on split states): the
    discriminator, LPIPS and the teacher are built once for both parametrisations."""
    ae_cfg = AutoencoderConfig(
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        z_channels=4,
        embed_dim=4,
        resolution=16,
    )
    gen = train.Generator(ae_cfg, 32 if use_vf else None, 0.0, rngs=nnx.Rngs(1))
    return (gen, *_shared_models())


@functools.cache
def _shared_models():
    """Built as one compiled program each (sharding.jit_init): eager init dispatches one small
    program per weight shape (seconds for LPIPS's VGG16)."""
    tcfg = foundation.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2)
    teacher = foundation.DinoV2Teacher(
        sharding.jit_init(lambda: foundation.Dinov2Model(tcfg, rngs=nnx.Rngs(3))),
        resolution=8 * 14,
    )
    disc = sharding.jit_init(
        lambda: disc_lib.NLayerDiscriminator(
            disc_lib.DiscriminatorConfig(input_nc=3, ndf=8, n_layers=2), rngs=nnx.Rngs(2)
        )
    )
    lp = sharding.jit_init(lambda: lpips_lib.LPIPS("float32", rngs=nnx.Rngs(4)))
    return disc, lp, teacher


def _naive(gen, disc, lp, teacher, x, rng, it, cfg: losses.LossConfig, use_vf):
    """d_weight, vf_weight, terms and generator grads by direct jax.grad of library functions."""
    gdef, P, rest = nnx.split(gen, nnx.Param, ...)
    ddef, dP, dS = nnx.split(disc, nnx.Param, nnx.BatchStat)
    rng_sample, _ = jax.random.split(rng)

    def pieces(params):
        g = nnx.merge(gdef, params, rest)
        post = g.autoencoder.encode(x)
        eps = jax.random.normal(rng_sample, post.mean.shape, jnp.float32)
        z = post.mean + post.std * eps
        xrec = g.autoencoder.decode(z)
        p_loss = lp(x, xrec)
        d = nnx.merge(ddef, dP, dS, copy=True)
        logits_fake = d(xrec, train=True)
        nll, w_nll, _ = losses.nll_loss(x, xrec, g.logvar[...], p_loss, cfg.perceptual_weight)
        g_loss = -jnp.mean(logits_fake)
        aux = teacher(x) if use_vf else None
        z_proj = g.linear_proj(z) if use_vf else None
        vf = losses.vf_loss(z_proj, aux, cfg.distmat_margin, cfg.cos_margin)[0] if use_vf else 0.0
        return dict(
            post=post,
            xrec=xrec,
            p_loss=p_loss,
            logits_fake=logits_fake,
            nll=nll,
            w_nll=w_nll,
            g=g_loss,
            vf=vf,
            aux=aux,
            z_proj=z_proj,
            logvar=g.logvar[...],
        )

    def kernel_grad(name, which):
        def f(params):
            return pieces(params)[name]

        grads = jax.grad(f)(P)
        k = grads["autoencoder"][which]["conv_out"]["kernel"]
        return k.get_value() if isinstance(k, nnx.Variable) else k

    d_weight = losses.adaptive_weight(
        kernel_grad("nll", "decoder"), kernel_grad("g", "decoder"), 1e4, cfg.disc_weight
    )
    vf_weight = (
        losses.adaptive_weight(
            kernel_grad("nll", "encoder"), kernel_grad("vf", "encoder"), 1e8, cfg.vf_weight
        )
        if use_vf
        else None
    )

    def total(params):
        p = pieces(params)
        t, terms = losses.generator_loss(
            x,
            p["xrec"],
            p["post"].mean,
            p["post"].logvar,
            p["logvar"],
            p["p_loss"],
            p["logits_fake"],
            p["z_proj"],
            p["aux"],
            d_weight,
            vf_weight,
            2 * it,
            cfg,
        )
        return t, terms

    (t, terms), grads = jax.value_and_grad(total, has_aux=True)(P)
    return terms, grads


@pytest.mark.slow
@pytest.mark.parametrize("stage_step,use_vf", [(5, True), (0, False)])
def test_step_equals_library_functions(stage_step, use_vf):
    gen, disc, lp, teacher = _tiny_models(use_vf)
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), jnp.float32, -1, 1)
    rng = jax.random.key(7)
    loss_cfg = losses.LossConfig(
        disc_start=5, kl_weight=1e-6, disc_weight=0.5, vf_weight=0.1, adaptive_vf=True
    )
    gdef, P, rest = nnx.split(gen, nnx.Param, ...)
    ddef, dP, dS = nnx.split(disc, nnx.Param, nnx.BatchStat)
    # SGD with lr 1 recovers the gradients from the parameter update exactly.
    sgd = optax.sgd(1.0)
    step_cfg = StepConfig(
        use_vf=use_vf,
        train_logvar=False,
        lpips_dropout=False,
        ema_decay=None,
        compute_dtype=jnp.float32,
    )
    frozen = frozen_state(lp, teacher)
    step = make_train_step(gdef, ddef, lp, teacher if use_vf else None, sgd, sgd, step_cfg)
    state = dict(
        gen=P,
        gen_rest=rest,
        disc=dP,
        disc_stats=dS,
        opt_g=sgd.init(P),
        opt_d=sgd.init(dP),
        step=jnp.int32(0),
    )
    # The stage settings go in traced (as the trainer passes them), the static ones as given.
    # Both programs compile alike, with the cheap options (conftest.py): only they are compared.
    it = jnp.int32(stage_step)
    jit = functools.partial(jax.jit, compiler_options=CHEAP_COMPILE_OPTIONS)
    new_state, metrics = jit(step)(state, frozen, {"image": x}, rng, loss_cfg.as_arrays(), it)

    # The networks' weights go in as arguments: closed over, they would be constants of the
    # program, which XLA folds through the networks (20 s of compile instead of 12 on 2 cores).
    graphdef, weights = nnx.split((gen, disc, lp, teacher))

    def naive(weights, x, rng, it, cfg):
        return _naive(*nnx.merge(graphdef, weights), x, rng, it, cfg, use_vf)

    terms, grads = jit(naive)(weights, x, rng, it, loss_cfg.as_arrays())
    for k in ("total_loss", "nll_loss", "kl_loss", "g_loss", "d_weight", "disc_factor"):
        np.testing.assert_allclose(metrics[f"train/{k}"], terms[k], rtol=2e-5, err_msg=k)
    if use_vf:
        for k in ("vf_loss", "vf_weight"):
            np.testing.assert_allclose(metrics[f"train/{k}"], terms[k], rtol=2e-5, err_msg=k)
    assert float(terms["disc_factor"]) == (1.0 if 2 * stage_step >= 5 else 0.0)
    # Compared in numpy (the same float32 arithmetic): eager jnp ops compile a program per shape.
    ours = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), P, new_state["gen"])
    grads = jax.tree.map(np.asarray, grads)
    # Tolerance per leaf, floored by the largest gradient: some leaves' true gradient is 0
    # (e.g. attention key biases: softmax ignores a constant shift) and holds only rounding.
    global_max = max(float(np.abs(b).max()) for b in jax.tree.leaves(grads))
    for path, (a, b) in zip(
        jax.tree_util.tree_leaves_with_path(ours),
        zip(jax.tree.leaves(ours), jax.tree.leaves(grads)),
    ):
        if "logvar" in jax.tree_util.keystr(path[0]):
            assert float(np.abs(a).max()) == 0.0  # the reference never trains logvar
            continue
        tol = 2e-4 * float(np.abs(b).max()) + 1e-6 * global_max
        assert float(np.abs(a - b).max()) <= tol, jax.tree_util.keystr(path[0])


@pytest.mark.slow
@VAVAE_TRAINER_GROUP
def test_overfits_sixteen_images(sample_images_dir, tmp_path):
    """PSNR on the 16 training images rises clearly (measured: see the assertion)."""
    from vavae_jax.metrics import image as image_metrics

    cfg = tiny_config(
        sample_images_dir,
        total_steps=10,  # measured: +4.9 dB (9.66 -> 14.60), +5.9 after 15, +6.5 after 30
        checkpoint_every_steps=10,
        image_every_steps=10,
        log_every_steps=10,
    )
    cfg.mesh.update(dict(data=1, fsdp=1, num_devices=1))
    cfg.sharding = "dp"
    cfg.data.random_flip = False
    images = _eval_images(cfg)
    # One compiled reconstruction for both weights (nnx.jit caches by the graph definition).
    reconstruct = nnx.jit(lambda gen, a: gen.autoencoder.decode(gen.autoencoder.encode(a).mode()))

    def psnr_of(state_gen, rest):
        rec = reconstruct(nnx.merge(gdef, state_gen, rest), images)
        to8 = image_metrics.to_uint8
        return float(np.mean(image_metrics.psnr(to8(images), to8(rec))))

    ae_cfg = train.autoencoder_config(cfg)
    init = train.Generator(ae_cfg, 64, 0.0, rngs=nnx.Rngs(0))
    gdef, _, _ = nnx.split(init, nnx.Param, ...)
    result = train.run(cfg, str(tmp_path / "overfit"))
    before = psnr_of(*nnx.split(init, nnx.Param, ...)[1:])
    after = psnr_of(result["state"]["gen"], result["state"]["gen_rest"])
    print(f"PSNR on 16 training images: {before:.2f} dB at init -> {after:.2f} dB after 10 steps")
    assert after > before + 3.0


def _eval_images(cfg):
    from vavae_jax import data as data_lib

    it, n = data_lib.make_eval_iterator(cfg.data, 16)
    batch = next(it)
    return jnp.asarray(batch["image"][batch["mask"]])


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------
def test_unknown_config_key_fails_in_launcher(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--config=configs/vavae_f16d32.py:small",
            "--config.loss.not_a_key=1",
            f"--workdir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode != 0
    assert "not_a_key" in out.stderr


def test_bad_inputs_raise_clear_errors(sample_images_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        train.run(
            tiny_config(sample_images_dir, **{"data.root": str(tmp_path / "does-not-exist")}),
            str(tmp_path / "a"),
        )
    empty = tmp_path / "no_weights"
    empty.mkdir()
    with pytest.raises((ValueError, FileNotFoundError), match="no_weights"):
        train.run(
            tiny_config(sample_images_dir, **{"teacher.path": str(empty)}), str(tmp_path / "b")
        )
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        train.run(tiny_config(sample_images_dir, global_batch_size=12), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="teacher.resolution"):
        train.run(
            tiny_config(sample_images_dir, **{"teacher.resolution": 112}), str(tmp_path / "d")
        )


@pytest.mark.slow
@VAVAE_TRAINER_GROUP
def test_nan_stops_with_last_good_checkpoint(sample_images_dir, tmp_path, monkeypatch):
    cfg = tiny_config(sample_images_dir, checkpoint_every_steps=1, total_steps=6)
    cfg.mesh.update(dict(data=1, fsdp=1, num_devices=1))
    cfg.sharding = "dp"
    # Step 1 is finite (and saved); step 2's batch holds a NaN pixel, so its loss and then every
    # weight are NaN. (Diverging through the optimizer instead, e.g. lr 1e10, would change the
    # compiled step: the learning rate is a constant of the program. This way the step is the one
    # test_overfits_sixteen_images compiles on this mesh, read from the compilation cache.)
    make_global_batch = train.data_lib.make_global_batch
    calls = []

    def poisoned(local, mesh):
        calls.append(mesh)
        if len(calls) == 2:
            image = np.array(local["image"], np.float32)
            image[0, 0, 0, 0] = np.nan
            local = {"image": image}
        return make_global_batch(local, mesh)

    monkeypatch.setattr(train.data_lib, "make_global_batch", poisoned)
    with pytest.raises(train.TrainingDivergedError) as e:
        train.run(cfg, str(tmp_path / "nan"))
    msg = str(e.value)
    assert "after step 2" in msg and "last good checkpoint is step 1" in msg, msg
    ckpts = tmp_path / "nan" / "checkpoints"
    assert (ckpts / "1").is_dir() and not (ckpts / "2").exists()


def test_schedule_stages():
    cfg = load_config("vavae_f16d32.py", "long")
    stages = train.make_schedule(cfg, steps_per_epoch=10)
    assert [(s.start, s.end) for s in stages] == [(0, 1000), (1000, 1150), (1150, 1300)]
    assert [s.loss.vf_weight for s in stages] == [0.5, 0.1, 0.1]
    margins = [(s.loss.distmat_margin, s.loss.cos_margin) for s in stages]
    assert margins == [(0, 0), (0, 0), (0.25, 0.5)]
    assert [s.loss.disc_start for s in stages] == [5001, 1, 1]
    assert train.stage_at(stages, 1149).loss.vf_weight == 0.1
    # The static loss settings come from config.loss in every stage.
    assert {s.loss.kl_weight for s in stages} == {cfg.loss.kl_weight}
    # One compiled step serves every stage: the traced leaves share shapes and dtypes.
    shapes = {str(jax.eval_shape(lambda s=s: train.step_inputs(s, 0))) for s in stages}
    assert len(shapes) == 1, shapes
    ldm = load_config("vavae_f16d32.py", "ldm")
    assert not ldm.use_vf and ldm.loss.vf_weight == 0.0
    with pytest.raises(ValueError, match="unknown variant"):
        load_config("vavae_f16d32.py", "smal")
    assert dataclasses.is_dataclass(train.Stage)
    # The log line of a stage: its steps and the fields stages change, the GAN's start in steps.
    assert stages[0].describe() == (
        "steps 0 to 999: vf_weight 0.5, margins distmat 0.0 / cos 0.0, GAN from step 2501 "
        "(disc_start 5001 counts the reference's two optimizer steps per step)"
    )
    restart = "; optimizers restart at step 1000" if stages[1].reset_optimizers else ""
    two = "the reference's two optimizer steps"
    assert stages[1].describe().endswith(f"step 1 (disc_start 1 counts {two} per step){restart}")
