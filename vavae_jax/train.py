"""The VA-VAE trainer: `run(config, workdir)`, behind `launch/train.py`.

Phases: (1) mesh and data, (2) models created already sharded, (3) resume or initialise,
(4) one jitted, sharded step per iteration, with logging, image grids, checkpoints and a clean
stop on SIGTERM or NaN. See configs/vavae_f16d32.py for every setting.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vavae_jax import data as data_lib
from vavae_jax import discriminator as disc_lib
from vavae_jax import foundation, losses
from vavae_jax import lpips as lpips_lib
from vavae_jax import model as model_lib
from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.runtime import compile_log, sharding, trainer
from vavae_jax.runtime.logging import MetricWriter, image_grid, save_png
from vavae_jax.runtime.loop import (  # noqa: F401  (re-exported)
    LoopControl,
    TrainingDivergedError,
    check_finite,
    finished_step,
    progress_bar,
    restore_or_init,
)
from vavae_jax.train_step import (  # noqa: F401  (frozen_state re-exported)
    Generator,
    StepConfig,
    frozen_state,
    make_train_step,
)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def compute_dtype(config, platform: str | None = None) -> jnp.dtype:
    """`trainer.compute_dtype` as a jnp dtype."""
    return jnp.dtype(trainer.compute_dtype(config, platform))


def autoencoder_config(config, *, platform: str | None = None) -> model_lib.AutoencoderConfig:
    m = config.model
    return model_lib.AutoencoderConfig(
        ch=m.ch,
        ch_mult=tuple(m.ch_mult),
        num_res_blocks=m.num_res_blocks,
        attn_resolutions=tuple(m.attn_resolutions),
        z_channels=m.z_channels,
        embed_dim=m.embed_dim,
        resolution=m.resolution,
        in_channels=m.in_channels,
        out_ch=m.out_ch,
        double_z=m.double_z,
        dropout=m.dropout,
        dtype=jnp.dtype(compute_dtype(config, platform)).name,
    )


def validate_config(config, mesh) -> None:
    trainer.validate_config(config, mesh)
    if config.data.resolution != config.model.resolution:
        raise ValueError(
            f"data.resolution={config.data.resolution} differs from "
            f"model.resolution={config.model.resolution}"
        )


# Teacher shapes for smoke runs only (random weights); real runs load facebook/dinov2-*.
SMOKE_TEACHERS = {
    "dinov2-tiny": foundation.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4
    ),
}


def build_teacher(tcfg, dtype) -> foundation.DinoV2Teacher:
    """The frozen DINOv2 teacher from a hub id / local folder, or random for smoke runs."""
    dtype = jnp.dtype(dtype).name
    if tcfg.path:
        return foundation.DinoV2Teacher.from_pretrained(
            tcfg.path, dtype=dtype, resolution=tcfg.resolution
        )
    presets = {**foundation.PRESETS, **SMOKE_TEACHERS}
    if not tcfg.allow_random:
        raise ValueError(
            "teacher.path is empty: pass --config.teacher.path=<hub id or folder> (a DINOv2 hub "
            "id such as facebook/dinov2-large, or a local transformers folder), or "
            "--config.teacher.allow_random=True for a smoke run with a random teacher"
        )
    if tcfg.preset not in presets:
        raise ValueError(f"teacher.preset={tcfg.preset!r}: expected one of {sorted(presets)}")
    log.warning(
        "the DINOv2 teacher (%s) has RANDOM weights: the VF loss aligns the latents with noise. "
        "This is a smoke run; pass --config.teacher.path=facebook/dinov2-large (or a local "
        "transformers folder) for real training.",
        tcfg.preset,
    )
    cfg = dataclasses.replace(presets[tcfg.preset], dtype=dtype)
    return _random_teacher(cfg, tcfg.resolution)


@functools.cache
def _random_teacher(cfg: foundation.Dinov2Config, resolution: int) -> foundation.DinoV2Teacher:
    """Smoke-run teachers are frozen and never mutated: build each shape once per process."""
    model = sharding.jit_init(
        lambda: foundation.Dinov2Model(cfg, rngs=nnx.Rngs(0)), name="init_random_teacher"
    )
    return foundation.DinoV2Teacher(model, resolution=resolution)


@functools.cache
def _random_lpips(dtype: str) -> lpips_lib.LPIPS:
    return sharding.jit_init(
        lambda: lpips_lib.LPIPS(dtype, rngs=nnx.Rngs(0)), name="init_random_lpips"
    )


def build_frozen(config, cdt):
    """The frozen networks: LPIPS and (for VA-VAE) the DINOv2 teacher."""
    if config.lpips.path in ("", "random") and config.lpips.allow_random:
        log.warning("LPIPS has RANDOM weights: the perceptual loss is meaningless (smoke run)")
        lp = _random_lpips(jnp.dtype(cdt).name)
    else:
        lp = lpips_lib.build_lpips(
            config.lpips.path, allow_random=config.lpips.allow_random, dtype=jnp.dtype(cdt).name
        )
    teacher = build_teacher(config.teacher, cdt) if config.use_vf else None
    _check_teacher_grid(config, teacher)
    return lp, teacher


def abstract_frozen(config, cdt):
    """The frozen networks as shapes only (nnx.eval_shape): no weights are read or downloaded.
    The teacher's shapes are those of teacher.preset, or of the config.json of a local
    teacher.path folder."""
    dtype = jnp.dtype(cdt).name
    lp = nnx.eval_shape(lambda: lpips_lib.LPIPS(dtype, rngs=nnx.Rngs(0)))
    teacher = None
    if config.use_vf:
        tcfg = _teacher_shape_config(config.teacher, dtype)
        teacher = nnx.eval_shape(
            lambda: foundation.DinoV2Teacher(
                foundation.Dinov2Model(tcfg, rngs=nnx.Rngs(0)),
                resolution=config.teacher.resolution,
            )
        )
    _check_teacher_grid(config, teacher)
    return lp, teacher


def _teacher_shape_config(tcfg, dtype: str) -> foundation.Dinov2Config:
    config_file = pathlib.Path(tcfg.path).expanduser() / "config.json" if tcfg.path else None
    if config_file is not None and config_file.is_file():
        return foundation.Dinov2Config.from_hf_dict(
            json.loads(config_file.read_text()), dtype=dtype
        )
    presets = {**foundation.PRESETS, **SMOKE_TEACHERS}
    if tcfg.preset not in presets:
        raise ValueError(f"teacher.preset={tcfg.preset!r}: expected one of {sorted(presets)}")
    return dataclasses.replace(presets[tcfg.preset], dtype=dtype)


def _check_teacher_grid(config, teacher) -> None:
    if teacher is None:
        return
    latent = config.model.resolution // 2 ** (len(config.model.ch_mult) - 1)
    if teacher.grid_size != latent:
        raise ValueError(
            f"the teacher sees a {teacher.grid_size}x{teacher.grid_size} token grid "
            f"(teacher.resolution={config.teacher.resolution}, patch 14) but the latents are "
            f"{latent}x{latent}; set teacher.resolution={latent * 14}"
        )


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Stage:
    start: int  # first iteration of the stage
    end: int  # one past its last iteration
    loss: losses.LossConfig  # config.loss with the stage's vf_weight, margins and disc_start
    reset_optimizers: bool

    def describe(self) -> str:
        """One log line: the stage's steps and what stages may change (losses.TRACED_FIELDS).
        disc_start counts the reference's Lightning steps, two per iteration: the GAN joins at
        iteration ceil(disc_start / 2)."""
        lc = self.loss
        gan = -(-lc.disc_start // 2)
        text = (
            f"steps {self.start} to {self.end - 1}: vf_weight {lc.vf_weight}, margins distmat "
            f"{lc.distmat_margin} / cos {lc.cos_margin}, GAN from step {gan} (disc_start "
            f"{lc.disc_start} counts the reference's two optimizer steps per step)"
        )
        if self.reset_optimizers and self.start:  # at step 0 there is nothing to restart
            text += f"; optimizers restart at step {self.start}"
        return text


def make_schedule(config, steps_per_epoch: int) -> list[Stage]:
    base = losses.LossConfig.from_config(config.loss)
    if config.stages:
        stages, start = [], 0
        for s in config.stages:
            n = int(s.epochs * steps_per_epoch)
            loss = dataclasses.replace(base, **{k: s[k] for k in losses.TRACED_FIELDS})
            stages.append(Stage(start, start + n, loss, s.reset_optimizers))
            start += n
        if config.total_steps > 0:  # a shorter smoke run of the same schedule
            stages = [
                dataclasses.replace(s, end=min(s.end, config.total_steps))
                for s in stages
                if s.start < config.total_steps
            ]
        return stages
    total = config.total_steps if config.total_steps > 0 else config.num_epochs * steps_per_epoch
    return [Stage(0, int(total), base, False)]


def stage_at(stages: list[Stage], step: int) -> Stage:
    for s in stages:
        if s.start <= step < s.end:
            return s
    return stages[-1]


# ---------------------------------------------------------------------------------------------
# The step, its state and their shardings: one builder for `run` and AOT compiles
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainStep(trainer.TrainStep):
    """`trainer.TrainStep` of the VA-VAE: `fn(state, frozen, batch, rng_bits, loss, stage_step)`.

    State: dict(gen, gen_rest, disc, disc_stats, opt_g, opt_d, step[, ema]), weights and Adam
    moments sharded by the logical rules, scalars replicated. `frozen` holds the states of LPIPS
    and the teacher (replicated); `loss` and `stage_step` come from `step_inputs(stage, step)`.
    """

    gen_def: nnx.GraphDef
    disc_def: nnx.GraphDef
    ae_config: model_lib.AutoencoderConfig
    optimizer_init: Callable  # (gen params, disc params) -> (opt_g, opt_d), pure

    def reset_optimizers(self, state: dict[str, Any]) -> dict[str, Any]:
        """Fresh Adam states for the current weights (a stage boundary), in their shardings."""
        out_sh = (self.state_sharding["opt_g"], self.state_sharding["opt_d"])
        opt_g, opt_d = jax.jit(self.optimizer_init, out_shardings=out_sh)(
            state["gen"], state["disc"]
        )
        return dict(state, opt_g=opt_g, opt_d=opt_d)


def build_step(config, mesh, lp, teacher) -> TrainStep:
    """The step of `config` on `mesh` from shapes only (nothing is allocated). `lp` and
    `teacher` (None without the VF loss) are the frozen networks, real or `abstract_frozen`."""
    platform = mesh.devices.flat[0].platform
    cdt = compute_dtype(config, platform)
    ae_cfg = autoencoder_config(config, platform=platform)
    teacher_dim = teacher.feature_dim if teacher is not None else None
    disc_cfg = disc_lib.DiscriminatorConfig(
        input_nc=ae_cfg.out_ch, ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers
    )
    tx_g = trainer.make_optimizer(config.optim.lr, config.optim)
    tx_d = trainer.make_optimizer(config.optim.disc_lr, config.optim)
    step_cfg = StepConfig.from_config(config, cdt)

    def construct(key):
        k_gen, k_disc = jax.random.split(key)
        gen = Generator(ae_cfg, teacher_dim, config.loss.logvar_init, rngs=nnx.Rngs(k_gen))
        disc = disc_lib.NLayerDiscriminator(disc_cfg, rngs=nnx.Rngs(k_disc))
        return gen, disc

    def optimizer_init(gen_params, disc_params):
        return tx_g.init(gen_params), tx_d.init(disc_params)

    def init(key):
        gen, disc = construct(key)
        _, gen_params, gen_rest = nnx.split(gen, nnx.Param, ...)
        _, disc_params, disc_stats = nnx.split(disc, nnx.Param, nnx.BatchStat)
        opt_g, opt_d = optimizer_init(gen_params, disc_params)
        state = dict(
            gen=gen_params,
            gen_rest=gen_rest,
            disc=disc_params,
            disc_stats=disc_stats,
            opt_g=opt_g,
            opt_d=opt_d,
            step=jnp.zeros((), jnp.int32),
        )
        if step_cfg.ema_decay is not None:
            state["ema"] = jax.tree.map(jnp.copy, gen_params)
        return state

    abstract_key = jax.eval_shape(lambda: jax.random.key(0))
    abstract_bits = jax.eval_shape(jax.random.key_data, abstract_key)
    gen, disc = nnx.eval_shape(construct, abstract_key)
    shapes = jax.eval_shape(init, abstract_key)
    # Adam's moments are copies of the parameters' nnx.State, annotations included: one call
    # shards them like their parameters (counts have no annotation: replicated).
    state_sh = sharding.state_shardings(shapes, mesh, config.sharding)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    step_fn = make_train_step(
        nnx.graphdef(gen),
        nnx.graphdef(disc),
        lp,
        teacher if config.use_vf else None,
        tx_g,
        tx_d,
        step_cfg,
    )

    # The rng travels as raw key data (uint32): every argument is then a plain array, whose
    # bytes the AOT report can count (it sizes arguments by numpy dtype).
    # The mesh is the abstract mesh of the trace, so that the models keep their activations split
    # over the batch (sharding.constrain_batch) instead of letting GSPMD reshard them.
    def vavae_train_step(state, frozen, batch, rng_bits, loss, stage_step):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            rng = jax.random.wrap_key_data(rng_bits)
            return step_fn(state, frozen, batch, rng, loss, stage_step)

    frozen = frozen_state(lp, teacher)
    r, b = ae_cfg.resolution, int(config.global_batch_size)
    batch_sh = {"image": sharding.batch_sharding(mesh, 4)}
    loss, stage_step = jax.eval_shape(lambda: step_inputs(make_schedule(config, 1)[0], 0))
    abstract_batch = {
        "image": jax.ShapeDtypeStruct(
            (b, r, r, ae_cfg.in_channels), jnp.float32, sharding=batch_sh["image"]
        )
    }
    abstract_rng = jax.ShapeDtypeStruct(
        abstract_bits.shape, abstract_bits.dtype, sharding=replicated
    )
    return TrainStep(
        fn=vavae_train_step,
        init=init,
        abstract_state=trainer.with_shardings(shapes, state_sh),
        state_sharding=state_sh,
        abstract_inputs=(
            trainer.with_shardings(frozen, replicated),
            abstract_batch,
            abstract_rng,
            trainer.with_shardings(loss, replicated),
            trainer.with_shardings(stage_step, replicated),
        ),
        replicated=replicated,
        gen_def=nnx.graphdef(gen),
        disc_def=nnx.graphdef(disc),
        ae_config=ae_cfg,
        optimizer_init=optimizer_init,
    )


def build_abstract_step(config, mesh):
    """The real train step of `config` from shapes, for launch/compile_check.py.

    Returns (fn, abstract_args, in_shardings, out_shardings, donate_argnums) as `run` jits them.
    Reads no data and no weights (LPIPS and the teacher are shapes: teacher.preset) and
    allocates nothing: `mesh` may hold compile-only devices (a TPU topology, a deviceless GPU),
    whose platform picks the compute dtype.
    """
    validate_config(config, mesh)
    lp, teacher = abstract_frozen(config, compute_dtype(config, mesh.devices.flat[0].platform))
    return build_step(config, mesh, lp, teacher).abstract()


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------
def run(
    config: ml_collections.ConfigDict, workdir: str, *, stop_after_steps: int | None = None
) -> dict[str, Any]:
    """Trains (or resumes) in `workdir`. `stop_after_steps` stops this invocation after that
    many steps exactly as SIGTERM does (checkpoint, then return): preemption on demand."""
    started = time.perf_counter()
    compile_log.install()
    mesh = sharding.mesh_from_config(config.mesh)
    validate_config(config, mesh)
    cdt = compute_dtype(config, mesh.devices.flat[0].platform)
    log.info("mesh: %s, compute dtype %s", dict(mesh.shape), jnp.dtype(cdt).name)
    workdir_path = ckpt_lib.as_path(workdir)
    rng = jax.random.key(config.seed)

    # ---- data --------------------------------------------------------------------------------
    train_iter, num_records = data_lib.make_train_iterator(
        config.data, config.global_batch_size, config.seed
    )
    steps_per_epoch = max(1, num_records // config.global_batch_size)
    stages = make_schedule(config, steps_per_epoch)
    total_steps = stages[-1].end
    log.info(
        "data: %d records, %d steps/epoch, %d steps in %d stage(s)",
        num_records,
        steps_per_epoch,
        total_steps,
        len(stages),
    )
    if (done := finished_step(workdir_path / "checkpoints", total_steps)) is not None:
        return {"step": done, "state": None, "workdir": str(workdir_path)}

    # ---- the step, its state layout and shardings (shared with build_abstract_step) ---------
    with compile_log.phase("frozen networks (LPIPS, teacher) ready", logger=log):
        lp, teacher = build_frozen(config, cdt)
    train_step = build_step(config, mesh, lp, teacher)
    gen_def = train_step.gen_def
    frozen = jax.device_put(frozen_state(lp, teacher), train_step.replicated)

    # ---- resume or initialise ----------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir_path / "checkpoints", max_to_keep=config.keep_checkpoints)

    def init():
        state = train_step.init_state(jax.random.fold_in(rng, 1))
        if config.init_from:
            # The generator and the PatchGAN with its BatchNorm statistics, from one reading of
            # the source (the reference's init_from_ckpt loads `loss.discriminator.*` with the
            # rest).
            gen = nnx.merge(gen_def, state["gen"], state["gen_rest"])
            disc = nnx.merge(train_step.disc_def, state["disc"], state["disc_stats"])
            init_from(gen, disc, config.init_from, train_step.ae_config)
            _, state["gen"], state["gen_rest"] = nnx.split(gen, nnx.Param, ...)
            if "ema" in state:
                state["ema"] = jax.tree.map(jnp.copy, state["gen"])
            _, state["disc"], state["disc_stats"] = nnx.split(disc, nnx.Param, nnx.BatchStat)
            # Adam's moments start at zero whatever the weights: opt_g needs no new init.
        return state

    state, start_step, jit_step = train_step.restore_or_init(
        ckpt, init, data_iterator=train_iter, config=config, workdir=workdir_path
    )
    replicated = train_step.replicated

    # ---- loop --------------------------------------------------------------------------------
    writer = MetricWriter(workdir_path / "logs")
    loop = LoopControl(
        config,
        ckpt,
        writer,
        start_step=start_step,
        total_steps=total_steps,
        desc="vavae",
        loss_key="train/total_loss",
        norm_key="train/param_norm_g",
        stop_after_steps=stop_after_steps,
        log_keys=("train/rec_loss", "train/vf_loss", "train/g_loss", "train/disc_loss"),
    )
    grid_batch = None
    stage = None
    step = start_step
    with loop:
        while step < total_steps:
            new_stage = stage_at(stages, step)
            if new_stage != stage:
                if stage is not None and new_stage.reset_optimizers:
                    state = train_step.reset_optimizers(state)
                    log.info("stage boundary at step %d: optimizers restarted", step)
                stage = new_stage
                log.info("stage %s", stage.describe())
            local = next(train_iter)
            batch = data_lib.make_global_batch({"image": local["image"]}, mesh)
            if grid_batch is None:
                grid_batch = batch["image"][: config.num_grid_images]
            step_rng = jax.random.fold_in(jax.random.fold_in(rng, 2), step)
            rng_bits = jax.device_put(jax.random.key_data(step_rng), replicated)
            loss, stage_step = jax.device_put(step_inputs(stage, step), replicated)
            state, metrics = jit_step(state, frozen, batch, rng_bits, loss, stage_step)
            if step == start_step:
                compile_log.report_first_step(started, metrics, logger=log)
            step = loop.stepped(step, metrics)
            if loop.log_due(step):
                loop.log(step, metrics, {"train/skipped_images": data_lib.skipped_count()})
            if loop.image_due(step):
                _write_grid(gen_def, state, grid_batch, writer, workdir_path, step)
            if loop.checkpoint_due(step):
                loop.save(step, state, data_iterator=train_iter, config=config.to_dict())
            if loop.stopping(step):
                break
    return {"step": step, "state": state, "workdir": str(workdir_path)}


def step_inputs(stage: Stage, step: int) -> tuple[losses.LossConfig, jax.Array]:
    """The step's `loss` and `stage_step` arguments at iteration `step` of `stage`."""
    return stage.loss.as_arrays(), jnp.int32(step - stage.start)


def _write_grid(gen_def, state, images, writer, workdir_path, step) -> None:
    gen = nnx.merge(gen_def, state.get("ema", state["gen"]), state["gen_rest"])
    rec = _reconstruct(gen.autoencoder, images)
    # Both are split over every host's devices: gather them (a collective, so every process
    # calls this; only process 0 writes).
    images, rec = multihost_utils.process_allgather((images, rec), tiled=True)
    grid = image_grid([np.asarray(images), np.asarray(rec)])
    writer.image(step, "reconstructions", grid)
    if jax.process_index() == 0:
        save_png(workdir_path / "samples" / f"recon_{step:07d}.png", grid)


@nnx.jit
def _reconstruct(ae, images):
    return ae.decode(ae.encode(images).mode())


def init_from(gen: Generator, disc, path: str, ae_cfg) -> bool:
    """Loads the autoencoder, VF projection and logvar weights into `gen` and the PatchGAN
    (weights and BatchNorm statistics) into `disc` from an official `.pt`, our export folder or a
    VA-VAE trainer run folder, reading it once; False (logged) when the source holds no PatchGAN
    (the discriminator then keeps its initialisation)."""
    from vavae_jax import checkpoints

    return checkpoints.load_init_from(gen, disc, path, ae_cfg)
