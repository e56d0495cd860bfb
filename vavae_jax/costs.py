"""The VA-VAE train step's convolutions, matrix products and least other traffic, read from the
step's own program (a jaxpr census), for `launch/bench/roofline.py`'s floor of that step.

    census = op_census(fn, *abstract_args)     # any function; shapes only, nothing runs
    plan = vavae_train_census(config, batch)   # the trainer's real step (vavae_jax.train)

`lightningdit_jax.costs` writes the DiT's GEMMs down by hand from the config; the VA-VAE step
(autoencoder, LPIPS-VGG16, PatchGAN, DINOv2 teacher, both optimizers, forward and backward) has
hundreds of convolutions, so here they are read from the traced program instead: every
`conv_general_dilated` and `dot_general` of the step's jaxpr (sub-jaxprs followed), grouped by
signature (shapes, dtypes, parameters) with their counts. `roofline.py` times each group alone.

Least other traffic (bytes that any program whose convolutions and products are separate kernels
must move besides them; a lower bound, so every rule below errs low):
  - reads of products: each output of a convolution / product that some other operation consumes
    is read once (the normalisations, activations, losses and optimizer updates after it);
  - writes of operands: each operand of a convolution / product that another operation computed
    (not a weight, input or constant) is written once by that operation;
  - optimizer state: both Adam optimizers read parameters, first and second moments and write
    them back (the gradients' reads are counted above), float32.
Layout-only operations (reshape, transpose, reversal, broadcast, squeeze, dtype conversion) pass
their input's origin through: they may fold into a neighbour, so they add no traffic here. Each
tensor is counted once however often it is used, at the size of its first use.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

PRODUCTS = ("conv_general_dilated", "dot_general")
PASS_THROUGH = frozenset(
    {
        "reshape",
        "transpose",
        "rev",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "copy",
        "copy_p",
    }
)
UNSUPPORTED = frozenset({"scan", "while", "cond"})


@dataclasses.dataclass
class ProductOp:
    """One signature of convolution or matrix product and how often the step runs it."""

    primitive: str
    shapes: tuple[tuple[int, ...], ...]  # operand shapes
    dtypes: tuple[str, ...]
    out_shape: tuple[int, ...]
    out_dtype: str
    params: dict[str, Any]
    count: int = 0

    @property
    def flops(self) -> float:
        """Multiply-adds x 2 of one call: for a convolution the output elements times the
        kernel's window times its input features per group (a transposed or dilated one is
        counted as if dense, an upper figure of the work); for a product the output elements
        times the contracted size."""
        out = math.prod(self.out_shape)
        if self.primitive == "conv_general_dilated":
            dn = self.params["dimension_numbers"]
            rhs = self.shapes[1]
            spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
            cin = rhs[dn.rhs_spec[1]]
            return 2.0 * out * spatial * cin
        (lhs_contract, _), _ = self.params["dimension_numbers"]
        k = math.prod(self.shapes[0][d] for d in lhs_contract)
        return 2.0 * out * k

    def describe(self) -> str:
        ins = " x ".join(f"{d}{list(s)}" for s, d in zip(self.shapes, self.dtypes, strict=True))
        return f"{self.primitive} {ins} -> {self.out_dtype}{list(self.out_shape)}"


@dataclasses.dataclass
class Census:
    ops: list[ProductOp]
    product_reads: int  # bytes: products' outputs read by other operations
    operand_writes: int  # bytes: products' computed operands written by other operations
    calls: int  # product calls in all

    @property
    def flops(self) -> float:
        return sum(op.flops * op.count for op in self.ops)


def _signature(eqn) -> tuple:
    params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
    avals = tuple((tuple(v.aval.shape), str(v.aval.dtype)) for v in eqn.invars)
    return (eqn.primitive.name, avals, params)


def _nbytes(aval) -> int:
    return int(math.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _sub_jaxprs(eqn) -> list:
    out = []
    for v in eqn.params.values():
        if isinstance(v, jax.extend.core.ClosedJaxpr):
            out.append(v.jaxpr)
        elif isinstance(v, jax.extend.core.Jaxpr):
            out.append(v)
    return out


def op_census(fn: Callable, *args) -> Census:
    """The convolutions and products of `fn(*args)` (arrays or ShapeDtypeStructs), grouped by
    signature, and the least traffic around them (module docstring)."""
    closed = jax.make_jaxpr(fn)(*args)
    ops: dict[tuple, ProductOp] = {}
    reads: dict[int, int] = {}  # origin id -> bytes (a product's output read by another op)
    writes: dict[int, int] = {}  # origin id -> bytes (a computed operand of a product)
    ids = itertools.count()

    # A value's origin: ("product" | "other", id) for computed values, None for the inputs,
    # weights and constants. Layout-only operations pass it through.
    def walk(jaxpr, origins: dict) -> list:
        def origin(v):
            return None if isinstance(v, jax.extend.core.Literal) else origins.get(v)

        def meet(eqn, counted: str, table: dict, made: str) -> None:
            """Counts the operands made by `counted` operations in `table` (once each); the
            outputs are `made`."""
            for v in eqn.invars:
                o = origin(v)
                if o is not None and o[0] == counted:
                    table.setdefault(o[1], _nbytes(v.aval))
            for v in eqn.outvars:
                origins[v] = (made, next(ids))

        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name in UNSUPPORTED:
                raise NotImplementedError(
                    f"op_census does not follow {name!r} (its trip count is not static here)"
                )
            subs = _sub_jaxprs(eqn)
            if name in PRODUCTS:
                key = _signature(eqn)
                if key not in ops:
                    out = eqn.outvars[0].aval
                    ops[key] = ProductOp(
                        primitive=name,
                        shapes=tuple(tuple(v.aval.shape) for v in eqn.invars),
                        dtypes=tuple(str(v.aval.dtype) for v in eqn.invars),
                        out_shape=tuple(out.shape),
                        out_dtype=str(out.dtype),
                        params=dict(eqn.params),
                    )
                ops[key].count += 1
                meet(eqn, "other", writes, "product")
            elif name in PASS_THROUGH:
                o = origin(eqn.invars[0])
                for v in eqn.outvars:
                    if o is not None:
                        origins[v] = o
            elif len(subs) == 1:  # jit / pjit / remat / custom_jvp_call bodies: inline
                sub = subs[0]
                inner = {iv: origin(v) for iv, v in zip(sub.invars, eqn.invars, strict=False)}
                inner = {k: o for k, o in inner.items() if o is not None}
                outs = walk(sub, inner)
                for v, o in zip(eqn.outvars, outs, strict=True):
                    if o is not None:
                        origins[v] = o
            elif subs:
                raise NotImplementedError(f"op_census: {name!r} holds {len(subs)} sub-programs")
            else:
                meet(eqn, "product", reads, "other")
        return [origin(v) for v in jaxpr.outvars]

    walk(closed.jaxpr, {})
    ordered = sorted(ops.values(), key=lambda op: -op.flops * op.count)
    return Census(
        ops=ordered,
        product_reads=sum(reads.values()),
        operand_writes=sum(writes.values()),
        calls=sum(op.count for op in ordered),
    )


def adam_state_bytes(num_params: int) -> int:
    """Least traffic of an Adam update besides its gradient: read parameters and both moments,
    write them back, float32."""
    return 6 * 4 * num_params


def vavae_train_census(config, batch: int, dtype: str | None = None) -> dict[str, Any]:
    """The census of the trainer's real VA-VAE step (`vavae_jax.train.build_step` from the config,
    frozen networks from shapes), at global batch `batch` on one device. `dtype` sets the
    compute dtype (default: the config's for this backend; "bfloat16" is the GPU's). The step
    computes the GAN terms at every step (weighted by the disc factor), so this is the program
    past disc_start that launch/bench/benchmark.py times.

    Returns {"census": Census, "traffic": {item: bytes}, "params": {group: count}}."""
    from vavae_jax import train
    from vavae_jax.runtime import sharding

    config = config.copy_and_resolve_references()
    config.global_batch_size = batch
    if dtype:
        config.dtype = dtype
    config.mesh.num_devices = 1
    mesh = sharding.mesh_from_config(config.mesh)
    cdt = train.compute_dtype(config, mesh.devices.flat[0].platform)
    ts = train.build_step(config, mesh, *train.abstract_frozen(config, cdt))
    census = op_census(ts.fn, ts.abstract_state, *ts.abstract_inputs)
    params = {
        group: int(sum(math.prod(x.shape) for x in jax.tree.leaves(ts.abstract_state[group])))
        for group in ("gen", "disc")
    }
    traffic = dict(
        product_outputs_read=census.product_reads,
        computed_operands_written=census.operand_writes,
        adam_generator=adam_state_bytes(params["gen"]),
        adam_discriminator=adam_state_bytes(params["disc"]),
    )
    return {"census": census, "traffic": traffic, "params": params}
