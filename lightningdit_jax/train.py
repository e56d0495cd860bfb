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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from lightningdit_jax import data as data_lib
from lightningdit_jax import model as model_lib
from lightningdit_jax import sampling
from lightningdit_jax import transport as transport_lib
from vavae_jax.data import make_global_batch
from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.runtime import compile_log, sharding
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


def compute_dtype(config, platform: str | None = None) -> str:
    """config.dtype; "auto" is bfloat16 on GPU/TPU, float32 on CPU. `platform` is the target's
    (a compile-only TPU mesh on a CPU host), by default JAX's backend."""
    if config.dtype == "auto":
        platform = platform or jax.default_backend()
        return "bfloat16" if platform in ("gpu", "tpu") else "float32"
    return config.dtype


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
        dtype=compute_dtype(config, platform),
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
    tx = optax.adamw(
        optim.lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
    )
    if optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx


def make_train_step(graphdef, tx, transport, ema_decay: float):
    """(state, batch, rng) -> (state, metrics): loss, AdamW update, EMA update."""

    def step(state, batch, rng):
        def loss_fn(params):
            model = nnx.merge(graphdef, params, state["rest"])
            return transport_lib.training_loss(
                model, batch["latent"], batch["label"], rng, transport=transport, train=True
            )

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # Reference update_ema: ema = decay * ema + (1 - decay) * param.
        ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1 - ema_decay), state["ema"], params)
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/param_norm"] = optax.tree.norm(params)
        new_state = dict(state, params=params, opt=opt, ema=ema, step=state["step"] + 1)
        return new_state, metrics

    return step


# ---------------------------------------------------------------------------------------------
# The step, its state and their shardings: one builder for `run`, sampling and AOT compiles
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The train step with its state layout and shardings on a mesh, built from shapes only.

    `run` jits it on real devices; `build_abstract_step` hands the same pieces to an
    ahead-of-time compile for devices that may not exist here; `load_ema_model` restores into
    `abstract_state`. State: dict(params, rest, opt, ema, step), every weight and Adam moment
    sharded by the logical rules, scalars replicated.
    """

    fn: Callable  # (state, batch, rng_bits) -> (state, metrics); not jitted
    graphdef: nnx.GraphDef
    model_config: model_lib.LightningDiTConfig
    init: Callable  # key -> initial state (pure: jit it with out_shardings=state_sharding)
    abstract_state: dict[str, Any]  # jax.ShapeDtypeStruct leaves carrying their shardings
    state_sharding: dict[str, Any]
    abstract_batch: dict[str, jax.ShapeDtypeStruct]  # the global batch
    batch_sharding: dict[str, jax.sharding.NamedSharding]
    abstract_rng: jax.ShapeDtypeStruct  # raw key data (jax.random.key_data of a key)
    replicated: jax.sharding.NamedSharding
    donate_argnums: tuple[int, ...] = (0,)  # the state is updated in place

    @property
    def in_shardings(self):
        return (self.state_sharding, self.batch_sharding, self.replicated)

    @property
    def out_shardings(self):
        return (self.state_sharding, self.replicated)

    def jit(self):
        return jax.jit(
            self.fn,
            in_shardings=self.in_shardings,
            out_shardings=self.out_shardings,
            donate_argnums=self.donate_argnums,
        )

    @property
    def abstract_args(self):
        return (self.abstract_state, self.abstract_batch, self.abstract_rng)

    def compile(self):
        """The step compiled ahead of time from `abstract_args`: needs no array, so it can
        overlap the state's initialisation. Call it with arrays in exactly these shardings."""
        return self.jit().lower(*self.abstract_args).compile()

    def init_state(self, key: jax.Array) -> dict[str, Any]:
        """The initial state, each array created directly in its sharding."""
        return jax.jit(self.init, out_shardings=self.state_sharding)(key)


def build_step(config, mesh, mcfg: model_lib.LightningDiTConfig) -> TrainStep:
    """The step of `config` for `mcfg` on `mesh`, from shapes only (nothing is allocated)."""
    tx = make_optimizer(config.optim)

    def construct(key):
        return model_lib.LightningDiT(mcfg, rngs=nnx.Rngs(key))

    def init(key):
        _, params, rest = nnx.split(construct(key), nnx.Param, ...)
        return dict(
            params=params,
            rest=rest,
            opt=tx.init(params),
            ema=jax.tree.map(jnp.copy, params),  # reference: update_ema(ema, model, decay=0)
            step=jnp.zeros((), jnp.int32),
        )

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

    return TrainStep(
        fn=lightningdit_train_step,
        graphdef=graphdef,
        model_config=mcfg,
        init=init,
        abstract_state=_with_shardings(shapes, state_sh),
        state_sharding=state_sh,
        abstract_batch={
            "latent": jax.ShapeDtypeStruct((b, *latent), jnp.float32, sharding=batch_sh["latent"]),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sh["label"]),
        },
        batch_sharding=batch_sh,
        abstract_rng=jax.ShapeDtypeStruct(
            abstract_bits.shape, abstract_bits.dtype, sharding=replicated
        ),
        replicated=replicated,
    )


def build_abstract_step(config, mesh):
    """The real train step of `config` from shapes, for launch/compile_check.py.

    Returns (fn, abstract_args, in_shardings, out_shardings, donate_argnums) as `run` jits them.
    Needs no data (the latent shape is the preset's) and allocates nothing: `mesh` may hold
    compile-only devices (a TPU topology, a deviceless GPU), whose platform picks the dtype.
    """
    validate_config(config, mesh)
    step = build_step(config, mesh, model_config(config, platform=_platform(mesh)))
    return step.fn, step.abstract_args, step.in_shardings, step.out_shardings, step.donate_argnums


def _platform(mesh) -> str:
    return mesh.devices.flat[0].platform


def _with_shardings(shapes, shardings):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )


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
    exact architecture into index.json) unless config.tokenizer.path names another one."""
    path = config.tokenizer.path
    if path and "://" not in path:
        path = os.path.abspath(path)  # sampling may run from another directory
    same = not path or (
        extracted.get("path") and os.path.realpath(path) == os.path.realpath(extracted["path"])
    )
    if same and extracted:
        return dict(path=extracted.get("path", ""), config=extracted.get("config", ""))
    return dict(path=path, config=config.tokenizer.config)


def validate_config(config, mesh) -> None:
    n_dev = mesh.devices.size
    if config.global_batch_size % n_dev:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is not divisible by the {n_dev} "
            f"devices; use a multiple of {n_dev}"
        )
    if config.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={config.dtype!r}: expected auto, float32, bfloat16 or float16")


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
    train_step = build_step(config, mesh, mcfg)
    graphdef, batch_sh = train_step.graphdef, train_step.batch_sharding
    compiling = compile_log.InBackground(train_step.compile, "compile-train-step")

    # ---- resume or initialise ----------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir_path / "checkpoints", max_to_keep=config.keep_checkpoints)
    state, start_step = restore_or_init(
        ckpt,
        train_step.abstract_state,
        lambda: train_step.init_state(jax.random.fold_in(rng, 1)),
        data_iterator=train_iter,
        config=config,
        workdir=workdir_path,
    )
    jit_step = compiling.result()

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
    import orbax.checkpoint as ocp

    ckpt = ckpt_lib.Checkpointer(ckpt_lib.as_path(workdir) / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no LightningDiT checkpoint in {ckpt.directory}")
        if "meta" not in ckpt.item_names(step):
            raise ValueError(f"checkpoint step {step} in {ckpt.directory} has no meta item")
        out = ckpt.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"], step=int(step))
    finally:
        ckpt.close()


def load_ema_model(workdir: str, mesh, *, step: int | None = None, dtype: str | None = None):
    """(EMA LightningDiT with sharded weights, meta, config) from a trainer workdir."""
    path = ckpt_lib.as_path(workdir)
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    if dtype is not None:
        config.dtype = dtype
    meta = load_meta(workdir, step)
    mcfg = model_config(config, tuple(meta["latent_shape"]), platform=_platform(mesh))
    train_step = build_step(config, mesh, mcfg)
    ckpt = ckpt_lib.Checkpointer(path / "checkpoints", async_save=False)
    try:
        state = ckpt.restore(meta["step"], train_step.abstract_state)["state"]
    finally:
        ckpt.close()
    return nnx.merge(train_step.graphdef, state["ema"], state["rest"]), meta, config


def _write_grid(config, graphdef, state, mcfg, meta, writer, workdir_path, step) -> None:
    """EMA samples of the first classes, shown as their first 3 de-normalised latent channels
    (decoding needs the tokenizer: launch/sample.py writes decoded grids)."""
    n = config.num_grid_images
    ema = nnx.merge(graphdef, state["ema"], state["rest"])
    z0 = jax.random.normal(
        jax.random.key(step), (n, mcfg.input_size, mcfg.input_size, mcfg.in_channels)
    )
    y = jnp.arange(n, dtype=jnp.int32) % mcfg.num_classes
    s = config.sample
    x = sampling.sample_ode(
        ema,
        z0,
        y,
        num_steps=config.grid_sample_steps,
        timestep_shift=s.timestep_shift,
        cfg_scale=s.cfg_scale if mcfg.class_dropout_prob > 0 else 1.0,
        cfg_interval_start=s.cfg_interval_start,
        cfg_channels=s.cfg_channels,
    )
    x = np.asarray(jax.device_get(x))[..., :3]
    # Each channel to [-1, 1] over the grid, for display only.
    x = x / max(float(np.abs(x).max()), 1e-6)
    grid = image_grid([x])
    writer.image(step, "samples_latent", grid)
    if jax.process_index() == 0:
        save_png(workdir_path / "samples" / f"latent_{step:07d}.png", grid)
