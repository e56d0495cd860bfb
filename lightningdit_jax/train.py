"""The LightningDiT trainer: `run(config, workdir)`, behind `launch/train.py`.

Reference: LightningDiT `train.py` (AdamW, EMA 0.9999 initialised to the model, optional grad
clipping, the transport's loss). Phases: (1) mesh and latents, (2) the model created already
sharded, (3) resume or initialise, (4) one jitted, sharded step per iteration with logging, sample
grids, checkpoints and a clean stop on SIGTERM or NaN. See configs/lightningdit_xl_vavae_f16d32.py.

Every checkpoint carries `meta`: the latent stats (mean, std, multiplier) the model was trained
on and the tokenizer reference, so that sampling de-normalises with the right numbers (reference
issue #34) and decodes with the right VA-VAE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lightningdit_jax import data as data_lib
from lightningdit_jax import fp8, sampling
from lightningdit_jax import model as model_lib
from lightningdit_jax import transport as transport_lib
from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.runtime import compile_log, sharding, trainer
from vavae_jax.runtime.batches import make_global_batch
from vavae_jax.runtime.logging import MetricWriter, image_grid, save_png
from vavae_jax.runtime.loop import (  # noqa: F401  (re-exported)
    LoopControl,
    TrainingDivergedError,
    check_finite,
    finished_step,
    progress_bar,
    restore_or_init,
)

log = logging.getLogger(__name__)


def model_config(
    config, latent_shape=None, *, platform: str | None = None
) -> model_lib.LightningDiTConfig:
    """The preset with the config's overrides; `latent_shape` [h, w, C] checks the data fits.

    The preset also fixes the latent shape the model trains on: [input_size, input_size,
    in_channels], 16x16x32 for XL/1 (VA-VAE f16d32 at 256 px)."""
    m = config.model
    if m.preset not in model_lib.PRESETS:
        raise ValueError(f"model.preset={m.preset!r}: expected one of {sorted(model_lib.PRESETS)}")
    cfg = dataclasses.replace(
        model_lib.PRESETS[m.preset],
        class_dropout_prob=m.class_dropout_prob,
        remat_policy=m.remat_policy,
        scan_unroll=m.scan_unroll,
        scan_layers=m.get("scan_layers", True),
        attention_impl=m.attention_impl or "auto",  # "" in configs written before 2026-11-22
        dtype=trainer.compute_dtype(config, platform),
        precision=m.get("precision", "default"),  # absent in configs before 2026-12-04
        fp8_scaling=m.get("fp8_scaling", "current"),  # absent in configs before 2026-12-05
        fp8_amax_history=m.get("fp8_amax_history", 16),
    )
    if latent_shape is not None:
        h, w, c = latent_shape
        if (h, w, c) != (cfg.input_size, cfg.input_size, cfg.in_channels):
            raise ValueError(
                f"the latents are {h}x{w}x{c} but model {m.preset} expects "
                f"{cfg.input_size}x{cfg.input_size}x{cfg.in_channels}: use latents of the "
                f"matching tokenizer or another preset"
            )
    return cfg


def make_transport(config) -> transport_lib.Transport:
    t = config.transport
    return transport_lib.Transport(
        path_type=t.path_type,
        prediction=t.prediction,
        use_cosine_loss=t.use_cosine_loss,
        use_lognorm=t.use_lognorm,
    )


def make_optimizer(optim) -> optax.GradientTransformation:
    """torch.optim.AdamW(lr, betas=(b1, b2), weight_decay) as the reference; optional clipping
    (reference `accelerator.clip_grad_norm_(..., max_grad_norm)`)."""
    return trainer.make_optimizer(optim.lr, optim)


def model_from(graphdef, state, weights: str = "params") -> nnx.Module:
    """The LightningDiT of a train state: its `weights` ("params" or "ema"), the rest, and the
    FP8 amax histories where the model keeps them (delayed scaling: `state["fp8"]`)."""
    return nnx.merge(graphdef, state[weights], state["rest"], *_fp8_state(state))


def _fp8_state(state) -> tuple:
    return (state["fp8"],) if "fp8" in state else ()


def make_train_step(graphdef, tx, transport, ema_decay: float):
    """(state, batch, rng) -> (state, metrics): loss, AdamW update, EMA update. With delayed
    FP8 scaling (`state["fp8"]`, the amax histories) the gradient pass returns the histories'
    new values as their "gradients" (`lightningdit_jax.fp8`): written back, not optimised."""

    def step(state, batch, rng):
        def loss_fn(params, fp8_state):
            model = nnx.merge(graphdef, params, state["rest"], *fp8_state)
            return transport_lib.training_loss(
                model, batch["latent"], batch["label"], rng, transport=transport, train=True
            )

        (loss, terms), (grads, fp8_state) = jax.value_and_grad(
            loss_fn, argnums=(0, 1), has_aux=True
        )(state["params"], _fp8_state(state))
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Reference update_ema: ema = decay * ema + (1 - decay) * param.
        ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1 - ema_decay), state["ema"], params)
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/param_norm"] = optax.tree.norm(params)
        new_state = dict(state, params=params, opt=opt, ema=ema, step=state["step"] + 1)
        if fp8_state:
            new_state["fp8"] = fp8_state[0]
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------------------------
# The step, its state and their shardings: one builder for `run`, sampling and AOT compiles
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainStep(trainer.TrainStep):
    """`trainer.TrainStep` of LightningDiT: `fn(state, batch, rng_bits)`; state: dict(params,
    rest, opt, ema, step), every weight and Adam moment sharded by the logical rules, scalars
    replicated. `load_ema_model` restores into `abstract_state`."""

    graphdef: nnx.GraphDef
    model_config: model_lib.LightningDiTConfig
    batch_sharding: dict[str, jax.sharding.NamedSharding]


def build_step(config, mesh, mcfg: model_lib.LightningDiTConfig) -> TrainStep:
    """The step of `config` for `mcfg` on `mesh`, from shapes only (nothing is allocated)."""
    tx = make_optimizer(config.optim)

    def construct(key):
        return model_lib.LightningDiT(mcfg, rngs=nnx.Rngs(key))

    def init(key):
        _, params, fp8_state, rest = nnx.split(construct(key), nnx.Param, fp8.AmaxHistory, ...)
        state = dict(
            params=params,
            rest=rest,
            opt=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),  # reference: update_ema(ema, model, decay=0)
            step=jnp.zeros((), jnp.int32),
        )
        if jax.tree.leaves(fp8_state):  # delayed scaling's amax histories
            state["fp8"] = fp8_state
        return state

    abstract_key = jax.eval_shape(lambda: jax.random.key(0))
    abstract_bits = jax.eval_shape(jax.random.key_data, abstract_key)
    graphdef = nnx.graphdef(nnx.eval_shape(construct, abstract_key))
    shapes = jax.eval_shape(init, abstract_key)
    # Adam's moments are copies of the parameters' nnx.State, annotations included: one call
    # shards them like their parameters (the count has no annotation: replicated).
    state_sh = sharding.state_shardings(shapes, mesh, config.sharding)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    latent = (mcfg.input_size, mcfg.input_size, mcfg.in_channels)
    b = int(config.global_batch_size)
    batch_sh = {
        "latent": sharding.batch_sharding(mesh, 1 + len(latent)),
        "label": sharding.batch_sharding(mesh, 1),
    }
    step_fn = make_train_step(graphdef, tx, make_transport(config), config.ema.decay)

    # The rng travels as raw key data (uint32): every argument is then a plain array, whose
    # bytes the AOT report can count (it sizes arguments by numpy dtype).
    # The mesh is made the abstract mesh of the trace: the model then keeps its activations split
    # over the batch (model.constrain_batch); without it GSPMD follows the fsdp-split weights and
    # splits activations along the hidden axis, gathering the batch (tensor-parallel style).
    def lightningdit_train_step(state, batch, rng_bits):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step_fn(state, batch, jax.random.wrap_key_data(rng_bits))

    abstract_batch = {
        "latent": jax.ShapeDtypeStruct((b, *latent), jnp.float32, sharding=batch_sh["latent"]),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh["label"]),
    }
    abstract_rng = jax.ShapeDtypeStruct(
        abstract_bits.shape, abstract_bits.dtype, sharding=replicated
    )
    return TrainStep(
        fn=lightningdit_train_step,
        init=init,
        abstract_state=trainer.with_shardings(shapes, state_sh),
        state_sharding=state_sh,
        abstract_inputs=(abstract_batch, abstract_rng),
        replicated=replicated,
        graphdef=graphdef,
        model_config=mcfg,
        batch_sharding=batch_sh,
    )


def build_abstract_step(config, mesh):
    """The real train step of `config` from shapes, for launch/compile_check.py.

    Returns (fn, abstract_args, in_shardings, out_shardings, donate_argnums) as `run` jits them.
    Needs no data (the latent shape is the preset's) and allocates nothing: `mesh` may hold
    compile-only devices (a TPU topology, a deviceless GPU), whose platform picks the dtype.
    """
    trainer.validate_config(config, mesh)
    return build_step(config, mesh, model_config(config, platform=_platform(mesh))).abstract()


def _platform(mesh) -> str:
    return mesh.devices.flat[0].platform


def _matmuls(mcfg: model_lib.LightningDiTConfig) -> str:
    """How the blocks' linear layers multiply, for the log."""
    if not mcfg.fp8:
        return f"matmuls in {mcfg.dtype}"
    scaling = (
        f"delayed scaling (amax history {mcfg.fp8_amax_history})"
        if mcfg.fp8_scaling == "delayed"
        else "current scaling"
    )
    return f"the blocks' linear layers in {mcfg.precision}, {scaling}"


def build_meta(config, stats, index) -> dict[str, Any]:
    """What sampling needs besides the weights: how to de-normalise and which VA-VAE decodes."""
    return dict(
        latent_norm=bool(config.data.latent_norm),
        latent_multiplier=float(config.data.latent_multiplier),
        latent_mean=[float(x) for x in stats["mean"]],
        latent_std=[float(x) for x in stats["std"]],
        latent_shape=list(index["shape"][1:]),
        tokenizer=_tokenizer_ref(config, index.get("tokenizer", {})),
        model_preset=config.model.preset,
    )


def _tokenizer_ref(config, extracted: dict) -> dict[str, Any]:
    """The tokenizer to record: the latents' own (launch/extract_latents.py wrote its path and
    exact architecture into index.json) unless config.tokenizer.path names another one; then
    its architecture is config.tokenizer.config, an AutoencoderConfig dict (data, never a
    config file to import)."""
    path = config.tokenizer.path
    if path and "://" not in path:
        path = os.path.abspath(path)  # sampling may run from another directory
    same = not path or (
        extracted.get("path") and os.path.realpath(path) == os.path.realpath(extracted["path"])
    )
    if same and extracted:
        return dict(path=extracted.get("path", ""), config=extracted.get("config", ""))
    arch = config.tokenizer.config
    if isinstance(arch, str):
        raise ValueError(
            f"tokenizer.config={arch!r}: a config file name; it is now the tokenizer's "
            f"architecture as data, the fields of vavae_jax.model.AutoencoderConfig "
            f"(configs/lightningdit_xl_vavae_f16d32.py sets the f16d32 preset's)"
        )
    return dict(path=path, config=json.loads(json.dumps(arch.to_dict())))


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
    trainer.validate_config(config, mesh)
    workdir_path = ckpt_lib.as_path(workdir)
    rng = jax.random.key(config.seed)

    # ---- data --------------------------------------------------------------------------------
    stats = data_lib.load_stats(config.data.data_dir)
    train_iter, index = data_lib.make_train_iterator(
        config.data, config.global_batch_size, config.seed, stats=stats
    )
    meta = build_meta(config, stats, index)
    total_steps = int(config.total_steps)
    log.info(
        "mesh %s; %d latent records %s; %d steps",
        dict(mesh.shape),
        train_iter.num_records,
        index["shape"],
        total_steps,
    )
    if (done := finished_step(workdir_path / "checkpoints", total_steps)) is not None:
        return {"step": done, "state": None, "meta": meta, "workdir": str(workdir_path)}

    # ---- the step, its state layout and shardings (shared with build_abstract_step) ---------
    mcfg = model_config(config, tuple(index["shape"][1:]), platform=_platform(mesh))
    if index.get("num_classes", 0) > mcfg.num_classes:
        raise ValueError(
            f"the latents in {config.data.data_dir} have labels up to {index['num_classes'] - 1} "
            f"but model {config.model.preset} has num_classes={mcfg.num_classes}: larger labels "
            f"would embed as the null (CFG) class or as NaN; extract fewer classes "
            f"(launch/extract_latents.py --max_records) or use a preset with more classes"
        )
    log.info("model %s: compute dtype %s, %s", config.model.preset, mcfg.dtype, _matmuls(mcfg))
    if mcfg.fp8_scaling != "current" and not mcfg.fp8:
        log.warning(
            "model.fp8_scaling=%r does nothing with model.precision=%r: the matmuls run in %s "
            "and no amax histories are kept",
            mcfg.fp8_scaling,
            mcfg.precision,
            mcfg.dtype,
        )
    train_step = build_step(config, mesh, mcfg)
    graphdef, batch_sh = train_step.graphdef, train_step.batch_sharding

    # ---- resume or initialise ----------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir_path / "checkpoints", max_to_keep=config.keep_checkpoints)
    state, start_step, jit_step = train_step.restore_or_init(
        ckpt,
        lambda: train_step.init_state(jax.random.fold_in(rng, 1)),
        data_iterator=train_iter,
        config=config,
        workdir=workdir_path,
    )

    # ---- loop --------------------------------------------------------------------------------
    writer = MetricWriter(workdir_path / "logs")
    loop = LoopControl(
        config,
        ckpt,
        writer,
        start_step=start_step,
        total_steps=total_steps,
        desc="lightningdit",
        loss_key="train/loss",
        norm_key="train/param_norm",
        stop_after_steps=stop_after_steps,
        log_keys=("train/mse", "train/cos", "train/grad_norm"),
    )
    step = start_step
    with loop:
        while step < total_steps:
            batch = make_global_batch(next(train_iter), mesh, batch_sh)
            step_rng = jax.random.fold_in(jax.random.fold_in(rng, 2), step)
            rng_bits = jax.device_put(jax.random.key_data(step_rng), train_step.replicated)
            state, metrics = jit_step(state, batch, rng_bits)
            if step == start_step:
                compile_log.report_first_step(started, metrics, logger=log)
            step = loop.stepped(step, metrics)
            if loop.log_due(step):
                loop.log(step, metrics)
            if loop.image_due(step):
                _write_grid(config, graphdef, state, mcfg, meta, writer, workdir_path, step)
            if loop.checkpoint_due(step):
                loop.save(step, state, data_iterator=train_iter, config=config.to_dict(), meta=meta)
            if loop.stopping(step):
                break
    return {"step": step, "state": state, "meta": meta, "workdir": str(workdir_path)}


# ---------------------------------------------------------------------------------------------
# Reading a run back (launch/sample.py)
# ---------------------------------------------------------------------------------------------
def load_meta(workdir: str, step: int | None = None) -> dict[str, Any]:
    """The checkpoint's meta: latent stats, multiplier, tokenizer reference, preset."""
    ckpt = ckpt_lib.Checkpointer(ckpt_lib.as_path(workdir) / "checkpoints", async_save=False)
    try:
        return _read_meta(ckpt, step)
    finally:
        ckpt.close()


def _read_meta(ckpt: ckpt_lib.Checkpointer, step: int | None) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no LightningDiT checkpoint in {ckpt.directory}")
    if "meta" not in ckpt.item_names(step):
        raise ValueError(f"checkpoint step {step} in {ckpt.directory} has no meta item")
    out = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"], step=int(step))


def load_ema_model(
    workdir: str,
    mesh,
    *,
    step: int | None = None,
    dtype: str | None = None,
    precision: str | None = None,
    config: ml_collections.ConfigDict | None = None,
    meta: dict[str, Any] | None = None,
):
    """(EMA LightningDiT with sharded weights, meta, config) from a trainer workdir: one
    checkpoint manager reads the meta (unless given: then `step` is its step) and the weights.
    `config`: the run's config.json when the caller has read it already. `dtype` / `precision`
    replace the run's compute dtype / model.precision (the weights are the same either way)."""
    path = ckpt_lib.as_path(workdir)
    if config is None:
        config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    config = ml_collections.ConfigDict(config.to_dict())  # the dtype override stays local
    if dtype is not None:
        config.dtype = dtype
    if precision is not None:
        config.model.precision = precision
    ckpt = ckpt_lib.Checkpointer(path / "checkpoints", async_save=False)
    try:
        meta = _read_meta(ckpt, step) if meta is None else meta
        mcfg = model_config(config, tuple(meta["latent_shape"]), platform=_platform(mesh))
        train_step = build_step(config, mesh, mcfg)
        abstract = train_step.abstract_state
        # The EMA weights and the rest only (not the parameters and Adam's moments). A model
        # with delayed FP8 scaling takes the run's amax histories where it kept some, else new
        # ones (a run trained in bf16 or with current scaling): sampling scales its inputs
        # from themselves either way (fp8.quantize_weights).
        part = {k: abstract[k] for k in ("ema", "rest", "fp8") if k in abstract}
        state = ckpt.restore_part(meta["step"], part, optional=("fp8",))
        if "fp8" in abstract and "fp8" not in state:
            state["fp8"] = jax.tree.map(  # empty histories: not in the checkpoint
                lambda a: jnp.zeros(a.shape, a.dtype, device=a.sharding), abstract["fp8"]
            )
    finally:
        ckpt.close()
    return model_from(train_step.graphdef, state, "ema"), meta, config


def _write_grid(config, graphdef, state, mcfg, meta, writer, workdir_path, step) -> None:
    """EMA samples of the first classes, shown as their first 3 de-normalised latent channels
    (decoding needs the tokenizer: launch/sample.py writes decoded grids)."""
    n = config.num_grid_images
    ema = model_from(graphdef, state, "ema")
    z0 = jax.random.normal(
        jax.random.key(step), (n, mcfg.input_size, mcfg.input_size, mcfg.in_channels)
    )
    y = jnp.arange(n, dtype=jnp.int32) % mcfg.num_classes
    guidance = sampling.Guidance.from_config(config.sample, num_steps=config.grid_sample_steps)
    if mcfg.class_dropout_prob <= 0:  # no null label: unguided
        guidance = guidance.replace(cfg_scale=1.0)
    x = sampling.sample_ode(ema, z0, y, guidance)
    x = np.asarray(jax.device_get(x))[..., :3]
    # Each channel to [-1, 1] over the grid, for display only.
    x = x / max(float(np.abs(x).max()), 1e-6)
    grid = image_grid([x])
    writer.image(step, "samples_latent", grid)
    if jax.process_index() == 0:
        save_png(workdir_path / "samples" / f"latent_{step:07d}.png", grid)
