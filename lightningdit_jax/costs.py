"""What one LightningDiT step costs, counted from its config: every GEMM, attention's FLOPs,
the least HBM traffic of everything else, the sampler's model calls. launch/bench/roofline.py
times these pieces for a floor; launch/bench/benchmark.py takes its MFU from `forward_flops`.

The least traffic (`traffic`) counts only bytes that no fusion of the non-GEMM work can avoid
while GEMMs and attention stay separate kernels (cuBLAS / XLA's Triton GEMMs, cuDNN attention):
  * every GEMM input made by non-GEMM work is written once, and every GEMM output that non-GEMM
    work consumes is read once (the modulated inputs, q/k before and after RoPE, the SwiGLU
    pre-activation and product, the gradients between the backward GEMMs); v reaches attention
    and dv reaches the qkv gradient without a pass of their own (strided views);
  * saved tensors that the backward needs and cannot get cheaper by recomputation are read once
    (the SwiGLU pre-activation; the attention and MLP branch outputs for the gate gradients);
  * the float32 residual stream: each fused non-GEMM pass that needs it reads at least 4 bytes
    per element (a stored float32 copy, or at least two bf16 tensors to rebuild it), and writes
    nothing (a lower bound); the same for the float32 gradient of the stream in the backward;
  * AdamW + EMA: parameters, both moments and the EMA read and written once in float32, the
    gradient read once in bf16 (34 bytes per parameter); the bf16 copies of the weights cost
    nothing (fused into the GEMMs), nor do bias gradients, norm statistics or per-image vectors.
Everything not listed is taken as free, so the sum is a lower bound, not an estimate.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightningdit_jax import sampling
from lightningdit_jax.model import abstract_model
from lightningdit_jax.transport import Transport


@dataclasses.dataclass(frozen=True)
class Gemm:
    """out[m, n] = A[m, k] @ B[k, n], `count` times per step. layout: "nn" (A [m, k], B [k, n]),
    "nt" (B stored [n, k]: a gradient with respect to the input) or "tn" (A stored [k, m]: a
    gradient with respect to the weight)."""

    name: str
    m: int
    k: int
    n: int
    layout: str
    count: int = 1

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.k * self.n * self.count


def _linear(name, m, k, n, *, train, dx=True, count=1) -> list[Gemm]:
    """A dense layer y[m, n] = x[m, k] w[k, n] and, in training, its two gradients."""
    out = [Gemm(f"{name}.fwd", m, k, n, "nn", count)]
    if train:
        if dx:
            out.append(Gemm(f"{name}.dx", m, n, k, "nt", count))
        out.append(Gemm(f"{name}.dw", k, m, n, "tn", count))
    return out


def _mlp_hidden(cfg) -> int:
    h = int(cfg.hidden_size * cfg.mlp_ratio)
    return int(2 / 3 * h) if cfg.use_swiglu else h


def gemms(cfg, batch: int, train: bool) -> list[Gemm]:
    """Every matmul of one forward (train=False) or one train step of the model, attention's
    score and value products excluded (see `attention_shape`) and the patch embedding (a
    convolution) included as `embed.conv`. `tests/test_roofline.py` checks the list against the
    dot products of the lowered program."""
    d, L = cfg.hidden_size, cfg.depth
    m = batch * cfg.num_patches
    hid = _mlp_hidden(cfg)
    n_mod = 4 if cfg.wo_shift else 6
    p2c = cfg.patch_size**2
    out: list[Gemm] = []
    # The input is data and the sinusoidal features have no parameters: no input gradients.
    out += _linear("embed.conv", m, p2c * cfg.in_channels, d, train=train, dx=False)
    out += _linear("t_embedder.mlp_0", batch, 256, d, train=train, dx=False)
    out += _linear("t_embedder.mlp_2", batch, d, d, train=train)
    out += _linear("block.adaLN", batch, d, n_mod * d, train=train, count=L)
    out += _linear("block.qkv", m, d, 3 * d, train=train, count=L)
    out += _linear("block.proj", m, d, d, train=train, count=L)
    if cfg.use_swiglu:
        out += _linear("block.w12", m, d, 2 * hid, train=train, count=L)
        out += _linear("block.w3", m, hid, d, train=train, count=L)
    else:
        out += _linear("block.fc1", m, d, hid, train=train, count=L)
        out += _linear("block.fc2", m, hid, d, train=train, count=L)
    out += _linear("final.adaLN", batch, d, 2 * d, train=train)
    out += _linear("final.linear", m, d, p2c * cfg.out_channels, train=train)
    return out


def attention_shape(cfg, batch: int) -> tuple[int, int, int, int]:
    """(batch, tokens, heads, head_dim) of each block's attention."""
    return batch, cfg.num_patches, cfg.num_heads, cfg.head_dim


def attention_flops(cfg, batch: int, train: bool) -> float:
    """QK^T and AV of every block (x3 for forward + backward, as for the dense layers)."""
    b, t, n, h = attention_shape(cfg, batch)
    return (3.0 if train else 1.0) * cfg.depth * 2 * (2.0 * b * n * t * t * h)


def trainable_params(cfg) -> int:
    """The optimizer's parameter count (nnx.Param leaves; the fixed position table excluded)."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


def traffic(cfg, batch: int, train: bool, n_params: int | None = None) -> dict[str, float]:
    """The least HBM bytes of one forward or train step outside GEMMs and attention, itemised
    (see the module docstring for what is counted and why each item is unavoidable)."""
    c, f = jnp.dtype(cfg.dtype).itemsize, 4  # compute dtype, float32 (stream, optimizer)
    d, L = cfg.hidden_size, cfg.depth
    m = batch * cfg.num_patches
    hid = _mlp_hidden(cfg)
    qk_pass = cfg.use_rope or cfg.use_qknorm  # q and k get an elementwise pass before attention
    items: dict[str, float] = {}

    def add(name, per_token_bytes, times=1):
        items[name] = items.get(name, 0.0) + float(per_token_bytes) * m * times

    # forward, per block
    add("fwd: modulated inputs of qkv and w12/fc1 (written)", 2 * c * d, L)
    if qk_pass:
        add("fwd: q, k read from the qkv output and written for attention", 4 * c * d, L)
    add("fwd: proj and w3/fc2 outputs (read by the residual passes)", 2 * c * d, L)
    if cfg.use_swiglu:
        add("fwd: SwiGLU (pre-activation read, product written)", 3 * c * hid, L)
    else:
        add("fwd: GELU (pre-activation read, output written)", 2 * c * hid, L)
    # the float32 stream: block 0's attention input is the patch output itself (a GEMM output,
    # counted below); block 0's MLP input can rebuild x_0 from it (c bytes); every later pass
    # and the final norm read >= 4 bytes per element.
    add("fwd: residual stream reads (>= 4 B/element per pass)", f * d * (2 * L - 1) + c * d)
    add("fwd: patch-embedding output read, final modulated input written", 2 * c * d)
    add("fwd: final output read", c * cfg.patch_size**2 * cfg.out_channels)
    if train:
        add("bwd: w3/fc2 input gradient (written), its dx output (read)", c * d + c * hid, L)
        if cfg.use_swiglu:
            add(
                "bwd: SwiGLU backward (pre-activation re-read, dg read, dh written)", 4 * c * hid, L
            )
        else:
            add("bwd: GELU backward (pre-activation re-read, gradient written)", 2 * c * hid, L)
        add("bwd: w12/fc1 dx output read, proj input gradient written", 2 * c * d, L)
        add("bwd: branch outputs re-read for the gate gradients", 2 * c * d, L)
        if qk_pass:
            add("bwd: dq, dk read and written into the qkv gradient", 4 * c * d, L)
        add("bwd: qkv dx output read", c * d, L)
        # each fused backward pass over the stream needs the forward stream (norm backward) and
        # the stream's gradient: >= 4 B each per element (2L passes, the first and last partial)
        add(
            "bwd: residual stream and its gradient (>= 4 B/element each per pass)",
            4 * f * d * L + c * d,
        )
        add("bwd: final dx output read, patch-embedding output gradient written", 2 * c * d)
        n_params = trainable_params(cfg) if n_params is None else n_params
        items["optimizer: AdamW + EMA (p, m, v, ema read+written f32, grad read bf16)"] = (
            8 * f + c
        ) * float(n_params)
    return items


def sampler_evaluations(num_steps: int, shift: float, cfg_interval_start: float) -> tuple[int, int]:
    """(guided, conditional-only) model calls of the Euler sampler: `num_steps - 1` steps, CFG
    (a forward at twice the batch) where t >= cfg_interval_start, else the conditional half."""
    t0, t1 = Transport().interval(eval=True)
    grid = np.asarray(sampling.time_grid(num_steps, t0, t1, shift))[: num_steps - 1]
    guided = int(np.sum(grid >= np.float32(cfg_interval_start)))
    return guided, num_steps - 1 - guided


def forward_flops(cfg) -> float:
    """Matmul FLOPs of one forward per image (2 per multiply-add): attention projections, QK^T,
    AV, MLP; the patch embedding and the blocks' adaLN included (the timestep MLP, the final
    layer's adaLN and output projection left out: 0.02% at XL/1). The MFU figures of
    BENCHMARKS.md use it (a train step counts 3 forwards)."""
    n = (cfg.input_size // cfg.patch_size) ** 2
    d = cfg.hidden_size
    if cfg.use_swiglu:
        h = int(2 / 3 * cfg.mlp_ratio * d)
        mlp = 3 * d * h
    else:
        mlp = 2 * d * int(cfg.mlp_ratio * d)
    per_block = n * (4 * d * d + mlp) + 2 * n * n * d + 6 * d * d
    return 2.0 * (cfg.depth * per_block + n * cfg.in_channels * cfg.patch_size**2 * d)
