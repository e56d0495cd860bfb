"""One mesh factory and logical-axis sharding for every model in the project.

Models annotate each weight with *logical* axis names (see `LOGICAL_AXES`); configs map them to
the mesh axes `data` and `fsdp` through rules. Parameters are never materialised on one device:
`create_sharded` traces the constructor with `nnx.eval_shape`, derives the shardings from the
annotations and runs the real initialisation under `jax.jit(..., out_shardings=...)`.

The models' annotated variables are made with `partitioned` / `param`, which switch off flax's
eager sharding for those variables alone: with it on, flax 0.12 refuses to build an annotated
`nnx.Param` outside a mesh context, which would make every model unusable on a plain CPU without
ceremony. We shard explicitly instead, and flax's global setting stays the user's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp")

# Logical axis names used by the models. A weight's annotation is a tuple of these (or None).
LOGICAL_AXES = {
    "embed": "model width of a transformer (hidden size)",
    "mlp": "hidden width of an MLP",
    "heads": "fused attention projection width (num_heads * head_dim)",
    "vocab": "number of classes of an embedding table",
    "conv_in": "input channels of a convolution kernel",
    "conv_out": "output channels of a convolution kernel",
}

# Rule sets by strategy name. "dp": everything replicated. "fsdp": the larger weight axes are
# split over the `fsdp` mesh axis (optimizer state follows the parameters).
RULES = {
    "dp": tuple((name, None) for name in LOGICAL_AXES),
    "fsdp": (
        ("embed", "fsdp"),
        ("mlp", None),
        ("heads", None),
        ("vocab", None),
        ("conv_in", None),
        ("conv_out", "fsdp"),
    ),
}

M = TypeVar("M", bound=nnx.Module)


def partitioned(initializer, axes: tuple[str | None, ...]):
    """`nnx.with_partitioning(initializer, axes)` for a model's weight: logical axis names,
    sharded later by `state_shardings` (never eagerly, whatever `nnx.use_eager_sharding` says)."""
    return nnx.with_partitioning(initializer, axes, eager_sharding=False)


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    """An `nnx.Param` annotated with logical axis names (see `partitioned`)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (`data`, `fsdp`) mesh. One of the sizes may be -1: it takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={data}, fsdp={fsdp}")
    for name, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"mesh: axis {name}={s} must be a positive size or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(
                f"mesh: {n} devices cannot be split with data={data}, fsdp={fsdp}: "
                f"{n} is not divisible by {known}. Choose sizes whose product divides {n}."
            )
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, but {n} are "
            f"available. Use -1 for one axis to fill the rest."
        )
    arr = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(arr, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def mesh_from_config(mesh_config) -> Mesh:
    """The (`data`, `fsdp`) mesh of a trainer's `config.mesh` (data, fsdp, num_devices) over all
    devices, or over the first `num_devices` when it is positive."""
    n = mesh_config.num_devices
    if n > jax.device_count():
        raise ValueError(f"mesh.num_devices={n} but only {jax.device_count()} devices are visible")
    devices = jax.devices()[:n] if n > 0 else None
    return make_mesh(mesh_config.data, mesh_config.fsdp, devices=devices)


def get_rules(strategy: str | Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """Logical-axis rules for a strategy name ("dp", "fsdp") or an explicit rule list."""
    if isinstance(strategy, str):
        if strategy not in RULES:
            raise ValueError(
                f"unknown sharding strategy {strategy!r}; expected one of {sorted(RULES)}"
            )
        return RULES[strategy]
    return tuple(tuple(r) for r in strategy)


def _fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes from dimensions they do not divide (small weights stay replicated)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for an (abstract) state from its logical annotations and the rules."""
    with nnx.logical_axis_rules(get_rules(rules)):
        specs = nnx.get_partition_spec(abstract_state)

    # Under the rules, get_partition_spec has already translated logical names to mesh axes.
    def to_sharding(x, spec):
        spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
        return NamedSharding(mesh, _fit_spec(spec, x.shape, mesh))

    return jax.tree.map(to_sharding, abstract_state, specs)


def create_sharded(constructor: Callable[[], M], mesh: Mesh, rules) -> M:
    """Builds `constructor()` with every variable created directly in its target sharding."""
    abstract = nnx.eval_shape(constructor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @jax.jit
    def init():
        return nnx.state(constructor())

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keeps the activation `x` split over its batch (leading) axis on the (`data`, `fsdp`) mesh
    axes when a mesh with those axes is the abstract mesh of the trace (the trainers' steps set
    it); a no-op otherwise. Without it GSPMD may follow fsdp-split weights and split activations
    along their feature axis, gathering the batch, or reshard around reshapes and convolutions."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    if x.shape[0] % math.prod(mesh.shape[a] for a in MESH_AXES):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(MESH_AXES))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The sharding of a batch: leading axis over (`data`, `fsdp`), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(MESH_AXES, *([None] * (ndim - 1))))


def optimizer_init_sharded(tx, params: Any, mesh: Mesh):
    """`tx.init(params)` with every moment sharded like its parameter, scalars replicated."""
    import optax

    abstract = jax.eval_shape(tx.init, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = optax.tree_map_params(
        tx, lambda _, s: s, abstract, param_sh, transform_non_params=lambda _: replicated
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)


def jit_init(constructor: Callable[[], M], *, name: str = "init") -> M:
    """Builds `constructor()` with its initialisation compiled as one program for the host CPU,
    then moves the state to the default device (for frozen networks with random weights).

    Eager random init dispatches one small XLA program per weight shape, which costs seconds on
    CPU. The one-program init must not be compiled for a GPU: there XLA fuses the random-number
    generation of every weight into kernels that kept ptxas busy for more than 6 minutes for
    the DINOv2-large teacher (the main job never reached its first step; BENCHMARKS.md). On the
    host CPU the same program compiles in seconds.
    """
    graphdef = nnx.graphdef(nnx.eval_shape(constructor))

    def init():
        return nnx.state(constructor())

    init.__name__ = init.__qualname__ = name
    cpu = jax.local_devices(backend="cpu")[0]
    with jax.default_device(cpu):
        state = jax.jit(init)()
    target = jax.local_devices()[0]
    if target.platform != "cpu":
        state = jax.device_put(state, target)
    return nnx.merge(graphdef, state)
