"""The trainer skeleton both trainers share (VA-VAE in vavae_jax.train, LightningDiT in
lightningdit_jax.train): the compute dtype, the config checks every run needs, the optimizer,
and `TrainStep`, the jitted step with its state layout and shardings built from shapes only."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

DTYPES = ("auto", "float32", "bfloat16", "float16")


def compute_dtype(config, platform: str | None = None) -> str:
    """The name of `config.dtype`; "auto" is bfloat16 on GPU/TPU, float32 on CPU. `platform` is
    the target's (a compile-only TPU mesh on a CPU host), by default JAX's backend."""
    if config.dtype == "auto":
        platform = platform or jax.default_backend()
        return "bfloat16" if platform in ("gpu", "tpu") else "float32"
    return str(config.dtype)


def validate_config(config, mesh) -> None:
    """The checks every run needs: the global batch splits over the devices and processes, and
    the dtype is known."""
    n_dev = mesh.devices.size
    b = config.global_batch_size
    if b % n_dev:
        raise ValueError(
            f"global_batch_size={b} is not divisible by the {n_dev} devices; use a multiple of "
            f"{n_dev} (e.g. --config.global_batch_size={max(n_dev, b // n_dev * n_dev)})"
        )
    if b % jax.process_count():
        raise ValueError(
            f"global_batch_size={b} is not divisible by {jax.process_count()} processes"
        )
    if config.dtype not in DTYPES:
        raise ValueError(f"dtype={config.dtype!r}: expected one of {', '.join(DTYPES)}")


def make_optimizer(lr: float, optim) -> optax.GradientTransformation:
    """The reference optimizers: torch.optim.AdamW(lr, betas, eps, weight_decay) when `optim`
    has a `weight_decay` field (LightningDiT), else torch.optim.Adam(lr, betas, eps) (VA-VAE);
    optional global-norm clipping first (reference `clip_grad_norm_`). The two keep their own
    optax state layouts, which the checkpoints store."""
    if "weight_decay" in optim:
        tx = optax.adamw(
            lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay
        )
    else:
        tx = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    if optim.grad_clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), tx)
    return tx


def with_shardings(tree, shardings):
    """jax.ShapeDtypeStructs of `tree`'s arrays carrying `shardings` (a tree or one sharding)."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree
        )
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def shardings_of(abstract) -> Any:
    """The shardings of a tree of jax.ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, abstract)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainStep:
    """A trainer's step with its state layout and shardings on a mesh, built from shapes only.

    `fn(state, *inputs) -> (state, metrics)` is pure and not jitted; `abstract_inputs` are its
    other arguments as jax.ShapeDtypeStructs carrying their shardings (the global batch, the rng
    as raw key data, and whatever else the trainer passes). `run` compiles it ahead of time
    (`compile`, which needs no array), `compile_check` hands `fn`, `abstract_args` and the
    shardings to an AOT compile for devices that may not exist here, and checkpoints restore
    into `abstract_state`. The state is donated: updated in place.
    """

    fn: Callable
    init: Callable  # key -> initial state (pure: `init_state` jits it into its shardings)
    abstract_state: dict[str, Any]  # jax.ShapeDtypeStruct leaves carrying their shardings
    state_sharding: dict[str, Any]
    abstract_inputs: tuple[Any, ...]
    replicated: jax.sharding.NamedSharding
    donate_argnums: tuple[int, ...] = (0,)

    @property
    def abstract_args(self) -> tuple[Any, ...]:
        return (self.abstract_state, *self.abstract_inputs)

    @property
    def in_shardings(self) -> tuple[Any, ...]:
        return (self.state_sharding, *shardings_of(self.abstract_inputs))

    @property
    def out_shardings(self) -> tuple[Any, Any]:
        return (self.state_sharding, self.replicated)

    def jit(self):
        return jax.jit(
            self.fn,
            in_shardings=self.in_shardings,
            out_shardings=self.out_shardings,
            donate_argnums=self.donate_argnums,
        )

    def compile(self):
        """The step compiled ahead of time from `abstract_args`: needs no array, so it can
        overlap the state's initialisation. Call it with arrays in exactly these shardings."""
        return self.jit().lower(*self.abstract_args).compile()

    def init_state(self, key: jax.Array) -> dict[str, Any]:
        """The initial state, each array created directly in its sharding."""
        return jax.jit(self.init, out_shardings=self.state_sharding)(key)

    def restore_or_init(self, ckpt, init: Callable, *, data_iterator, config, workdir):
        """(state, start_step, compiled step): `loop.restore_or_init` (resume checks included),
        with the step compiled ahead of time in a background thread from the moment the run is
        known to go ahead, so that the compile overlaps the init or the restore."""
        from vavae_jax.runtime import compile_log, loop

        compiling = []

        def start_compile():
            compiling.append(compile_log.InBackground(self.compile, "compile-train-step"))

        state, start_step = loop.restore_or_init(
            ckpt,
            self.abstract_state,
            init,
            data_iterator=data_iterator,
            config=config,
            workdir=workdir,
            on_ready=start_compile,
        )
        return state, start_step, compiling[0].result()

    def abstract(self):
        """(fn, abstract_args, in_shardings, out_shardings, donate_argnums) for an AOT compile."""
        return (
            self.fn,
            self.abstract_args,
            self.in_shardings,
            self.out_shardings,
            self.donate_argnums,
        )
