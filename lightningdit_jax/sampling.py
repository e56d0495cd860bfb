"""Samplers of LightningDiT: Euler / Heun / dopri5 ODE and Euler-Maruyama SDE with CFG.

Ported from the reference `transport/integrators.py` (ode, sde), `transport/transport.py`
(Sampler.sample_ode, Sampler.sample_sde and its last step) and `models/lightningdit.py`
(forward_with_cfg). Time runs from t = 0 (noise z0) to t = 1 (data).

Classifier-free guidance. `y` holds only the conditional labels; the null label
(`config.num_classes`) is added inside. Guidance applies where t >= `cfg_interval_start` (the time
of the batch decides: the reference tests `t[0]`) and `cfg_scale != 1`:
  out = uncond + cfg_scale * (cond - uncond)
on all channels (`cfg_channels="all"`, the standard formula) or on the first 3 only with the other
channels taken from the conditional output (`"first3"`, what the reference ships and its FID
numbers use). Where guidance is off the model runs on the conditional half only (`lax.cond`),
instead of computing and discarding the unconditional half.

The settings of a sampler are one `Guidance` (the ODE grid and the guidance; field names as in
`config.sample` and launch/sample.py's flags): `sample_ode(model, z0, y, guidance)`; keyword
arguments override single fields (`sample_ode(model, z0, y, num_steps=250, cfg_scale=6.7)`).

Each sampler is one jitted function; the loop is a `lax.fori_loop` over a traced number of steps
(a `lax.while_loop` for dopri5), so changing the step count, the shift or the guidance settings
does not recompile. Shard `z0` / `y` over the batch (`sharding.batch_sharding`) and the
computation follows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightningdit_jax import fp8
from lightningdit_jax.transport import DIFFUSION_FORMS, Transport

CFG_CHANNELS = ("first3", "all")
ODE_METHODS = ("euler", "heun", "dopri5")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How to sample: the ODE grid and classifier-free guidance (reference `sample:` section).

    `num_steps` grid points (so `num_steps - 1` steps), `method` the ODE solver, `timestep_shift`
    the grid's shift (0: none), guidance `cfg_scale` (1: none) where t >= `cfg_interval_start`
    on `cfg_channels` ("first3": the reference's, "all": the standard formula). The SDE sampler
    uses num_steps and the guidance fields; its grid is uniform, as the reference's.
    """

    num_steps: int = 250
    method: str = "euler"
    timestep_shift: float = 0.0
    cfg_scale: float = 1.0
    cfg_interval_start: float = 0.0
    cfg_channels: str = "first3"

    def __post_init__(self):
        if self.method not in ODE_METHODS:
            raise ValueError(f"method={self.method!r}: expected one of {ODE_METHODS}")
        if self.num_steps < 2:
            raise ValueError(f"num_steps={self.num_steps}: the grid needs at least 2 points")
        if self.cfg_channels not in CFG_CHANNELS:
            raise ValueError(f"cfg_channels={self.cfg_channels!r}: expected one of {CFG_CHANNELS}")

    @classmethod
    def from_config(cls, sample_config, **overrides) -> Guidance:
        """From a run's `config.sample` (ConfigDict or dict); overrides that are None are
        skipped (command-line flags left unset)."""
        fields = dict(sample_config)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ValueError(f"config.sample has fields {unknown} that Guidance lacks: {names}")
        return cls(**fields).replace(**overrides)

    def replace(self, **overrides) -> Guidance:
        """A copy with the overrides that are not None."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cfg_model_output(
    model,
    x: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    cfg_scale: float | jax.Array,
    cfg_interval_start: float | jax.Array = 0.0,
    cfg_channels: str = "first3",
    guided: bool = True,
) -> jax.Array:
    """The guided model output for the conditional batch x [B, H, W, C], t [B], y [B].

    Reference `LightningDiT.forward_with_cfg` (its conditional half). `guided=False` (static)
    compiles only the conditional call; otherwise `lax.cond` on t[0] >= cfg_interval_start (and
    cfg_scale != 1) selects at run time between the doubled batch and the conditional half.
    """
    if cfg_channels not in CFG_CHANNELS:
        raise ValueError(f"cfg_channels={cfg_channels!r}: expected one of {CFG_CHANNELS}")
    # The model is rebuilt inside each branch: NNX modules must not cross JAX trace levels.
    graphdef, state = nnx.split(model)
    null_label = model.config.null_label

    def conditional():
        return nnx.merge(graphdef, state, copy=True)(x, t, y).astype(jnp.float32)

    if not guided:
        return conditional()

    def with_guidance():
        null = jnp.full_like(y, null_label)
        out = nnx.merge(graphdef, state, copy=True)(
            jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([y, null])
        ).astype(jnp.float32)
        cond, uncond = jnp.split(out, 2)
        guided_out = uncond + cfg_scale * (cond - uncond)
        if cfg_channels == "first3":
            guided_out = jnp.concatenate([guided_out[..., :3], cond[..., 3:]], axis=-1)
        return guided_out

    use = (t[0] >= cfg_interval_start) & (cfg_scale != 1.0)
    return jax.lax.cond(use, with_guidance, conditional)


def _prepare(model, z0, y, g: Guidance):
    """What every sampler passes to its jitted body: (graphdef, state, z0 float32, y int32,
    the traced guidance scalars, whether guidance runs at all (static))."""
    cfg = model.config
    if z0.ndim != 4 or y.shape != (z0.shape[0],):
        raise ValueError(f"expected z0 [B, H, W, C] and y [B], got {z0.shape} and {y.shape}")
    guided = float(g.cfg_scale) != 1.0
    if guided and cfg.class_dropout_prob <= 0:
        raise ValueError(
            f"cfg_scale={g.cfg_scale} needs the null label, but this model was built with "
            f"class_dropout_prob={cfg.class_dropout_prob} (no unconditional embedding)"
        )
    if getattr(cfg, "fp8", False):  # FP8 blocks: kernels quantised once for all the steps
        model = fp8.quantize_weights(model)
    graphdef, state = nnx.split(model)
    scalars = dict(
        cfg_scale=jnp.float32(g.cfg_scale), cfg_interval_start=jnp.float32(g.cfg_interval_start)
    )
    z0, y = jnp.asarray(z0, jnp.float32), jnp.asarray(y, jnp.int32)
    return graphdef, state, z0, y, scalars, guided


def _drift_fn(graphdef, state, y, scalars, *, guided, cfg_channels, transport):
    """f(t, x) -> (ODE drift, model output) at scalar time t for the whole batch."""

    def f(t, x):
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        model = nnx.merge(graphdef, state, copy=True)  # Variables of this (loop body) trace level
        out = cfg_model_output(model, x, tb, y, **scalars, cfg_channels=cfg_channels, guided=guided)
        return transport.velocity(out, x, tb), out

    return f


def grid_point(i, num_steps, t0, t1, timestep_shift):
    """Point i of the reference grid: torch.linspace(t0, t1, num_steps) in float32 (the first
    half counted from t0, the second from t1, as torch's scalar kernel does; its vectorised
    kernel can differ in the last bit), then the timestep shift t -> s t / (1 + (s - 1) t) when
    s > 0 (reference `ode.__init__`)."""
    i = jnp.asarray(i, jnp.int32)
    n = jnp.asarray(num_steps, jnp.int32)
    t0, t1 = jnp.float32(t0), jnp.float32(t1)
    step = (t1 - t0) / (n - 1).astype(jnp.float32)
    t = jnp.where(
        i < n // 2, t0 + step * i.astype(jnp.float32), t1 - step * (n - 1 - i).astype(jnp.float32)
    )
    s = jnp.asarray(timestep_shift, jnp.float32)
    return jnp.where(s > 0, s * t / (1 + (s - 1) * t), t)


def time_grid(num_steps: int, t0: float, t1: float, timestep_shift) -> jax.Array:
    """The whole grid, [num_steps] float32 (see `grid_point`)."""
    return grid_point(jnp.arange(num_steps), num_steps, t0, t1, timestep_shift)


def sample_ode(
    model,
    z0: jax.Array,
    y: jax.Array,
    guidance: Guidance | None = None,
    *,
    num_steps: int | None = None,
    method: str | None = None,
    timestep_shift: float | None = None,
    cfg_scale: float | None = None,
    cfg_interval_start: float | None = None,
    cfg_channels: str | None = None,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    max_steps: int = 4096,
    transport: Transport | None = None,
) -> jax.Array:
    """Integrates the probability-flow ODE from noise z0 [B, H, W, C] (t = 0) to data (t = 1).

    The settings are `guidance` (default `Guidance()`) with the keyword arguments given (not
    None) replacing its fields. euler / heun: fixed steps between the `num_steps` points of the
    (shifted) reference grid, so `num_steps - 1` steps (heun: two model calls per step, as
    torchdiffeq's heun2); `num_steps`, the shift and the guidance settings are traced, so
    changing them does not recompile. dopri5: adaptive Dormand-Prince 5(4) with `atol` / `rtol`
    (reference defaults 1e-6 / 1e-3), ending exactly at t1; `num_steps` and the shift do not
    change its endpoint. A dopri5 run that needs more than `max_steps` steps returns NaN.
    Returns z1 [B, H, W, C] float32.
    """
    g = (guidance or Guidance()).replace(
        num_steps=num_steps,
        method=method,
        timestep_shift=timestep_shift,
        cfg_scale=cfg_scale,
        cfg_interval_start=cfg_interval_start,
        cfg_channels=cfg_channels,
    )
    graphdef, state, z0, y, scalars, guided = _prepare(model, z0, y, g)
    return _sample_ode(
        graphdef,
        state,
        z0,
        y,
        jnp.int32(g.num_steps),
        jnp.float32(g.timestep_shift),
        scalars,
        jnp.float32(atol),
        jnp.float32(rtol),
        method=g.method,
        guided=guided,
        cfg_channels=g.cfg_channels,
        max_steps=max_steps,
        transport=transport or Transport(),
    )


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "method", "guided", "cfg_channels", "max_steps", "transport"),
)
def _sample_ode(
    graphdef,
    state,
    z0,
    y,
    num_steps,
    timestep_shift,
    scalars,
    atol,
    rtol,
    *,
    method,
    guided,
    cfg_channels,
    max_steps,
    transport,
):
    f = _drift_fn(
        graphdef, state, y, scalars, guided=guided, cfg_channels=cfg_channels, transport=transport
    )
    t0, t1 = transport.interval(eval=True)
    if method == "dopri5":
        return dopri5(
            lambda t, x: f(t, x)[0], z0, t0, t1, atol=atol, rtol=rtol, max_steps=max_steps
        )

    def step(i, x):
        t = grid_point(i, num_steps, t0, t1, timestep_shift)
        dt = grid_point(i + 1, num_steps, t0, t1, timestep_shift) - t
        k1 = f(t, x)[0]
        if method == "euler":
            return x + dt * k1
        k2 = f(t + dt, x + dt * k1)[0]
        return x + dt * 0.5 * (k1 + k2)

    return jax.lax.fori_loop(0, num_steps - 1, step, z0)


# Dormand-Prince 5(4) tableau: stage nodes, stage weights (row i feeds stage i + 1), the 5th-order
# solution (FSAL: it is also the 7th stage) and the embedded 4th-order one.
_DP_C = np.array([1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0], np.float32)
_DP_A = np.array(
    [
        [1 / 5, 0, 0, 0, 0, 0, 0],
        [3 / 40, 9 / 40, 0, 0, 0, 0, 0],
        [44 / 45, -56 / 15, 32 / 9, 0, 0, 0, 0],
        [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729, 0, 0, 0],
        [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656, 0, 0],
        [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
    ],
    np.float32,
)
_DP_B4 = np.array(
    [5179 / 57600, 0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40], np.float32
)
_DP_ERR = np.concatenate([_DP_A[-1, :6], [0.0]]).astype(np.float32) - _DP_B4


def _rms(x):
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _weighted(w, ks):
    """sum_i w[i] * ks[i] for ks [S, ...]."""
    return jnp.tensordot(w, ks, axes=1)


def dopri5(f, x0, t0: float, t1: float, *, atol, rtol, max_steps: int = 4096):
    """Adaptive Dormand-Prince 5(4) for dx/dt = f(t, x) from t0 to t1 (one step size per batch).

    Error control as torchdiffeq (the reference's solver): RMS of err / (atol + rtol max|x|),
    safety 0.9, growth in [0.2, 10], initial step by Hairer's rule; the last step is shortened to
    end exactly at t1 (torchdiffeq steps past it and interpolates). The six new stages of a step
    run in a `lax.scan`, so the model is compiled once for them. Returns x(t1), or NaN if
    `max_steps` steps did not reach t1.
    """
    t0 = jnp.float32(t0)
    t1 = jnp.float32(t1)
    f0 = f(t0, x0)
    # Initial step (Hairer, Norsett & Wanner II.4; torchdiffeq _select_initial_step, order 4).
    scale = atol + jnp.abs(x0) * rtol
    d0, d1 = _rms(x0 / scale), _rms(f0 / scale)
    h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
    f1 = f(t0 + h0, x0 + h0 * f0)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = jnp.where(
        (d1 <= 1e-15) & (d2 <= 1e-15),
        jnp.maximum(1e-6, h0 * 1e-3),
        (0.01 / jnp.maximum(d1, d2)) ** (1 / 5),
    )
    h = jnp.minimum(100 * h0, h1).astype(jnp.float32)

    def cond(carry):
        t, _, _, _, n = carry
        return (t < t1) & (n < max_steps)

    def body(carry):
        t, x, k1, h, n = carry
        last = h >= t1 - t
        h = jnp.where(last, t1 - t, h)
        ks = jnp.zeros((7, *x.shape), x.dtype).at[0].set(k1)

        def stage(ks, i):
            xi = x + h * _weighted(jnp.asarray(_DP_A)[i], ks)
            return ks.at[i + 1].set(f(t + jnp.asarray(_DP_C)[i] * h, xi)), None

        ks, _ = jax.lax.scan(stage, ks, jnp.arange(6))
        x5 = x + h * _weighted(jnp.asarray(_DP_A)[5], ks)
        err = h * _weighted(jnp.asarray(_DP_ERR), ks)
        tol = atol + rtol * jnp.maximum(jnp.abs(x), jnp.abs(x5))
        ratio = _rms(err / tol)
        accept = ratio <= 1.0
        factor = jnp.where(ratio == 0, 10.0, 0.9 * ratio ** (-1 / 5))
        factor = jnp.clip(factor, jnp.where(accept, 1.0, 0.2), 10.0)
        t_new = jnp.where(last, t1, t + h)
        return (
            jnp.where(accept, t_new, t),
            jnp.where(accept, x5, x),
            jnp.where(accept, ks[6], k1),
            (h * factor).astype(jnp.float32),
            n + 1,
        )

    t, x, _, _, _ = jax.lax.while_loop(cond, body, (t0, x0, f0, h, jnp.int32(0)))
    return jnp.where(t >= t1, x, jnp.nan)


def sample_sde(
    model,
    z0: jax.Array,
    y: jax.Array,
    rng: jax.Array,
    guidance: Guidance | None = None,
    *,
    num_steps: int | None = None,
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str | None = "Mean",
    last_step_size: float = 0.04,
    cfg_scale: float | None = None,
    cfg_interval_start: float | None = None,
    cfg_channels: str | None = None,
    transport: Transport | None = None,
) -> jax.Array:
    """Euler-Maruyama for dx = [v + w_t score] dt + sqrt(2 w_t) dW (reference Sampler.sample_sde).

    `guidance` (default `Guidance()`, keyword arguments given replace its fields) gives
    `num_steps` and the guidance; its method and timestep shift do not apply. `num_steps` grid
    points on [t0, 1 - last_step_size]: `num_steps - 1` stochastic steps, then the reference's
    last step to t = 1: "Mean" (drift only), "Tweedie", "Euler" (ODE drift) or None (stop at
    t1). `diffusion_form` is the reference's w_t; the default "sigma" (w_t = 1 - t on the Linear
    path) is SiT's sampling default; the reference Sampler's "SBDM" default is singular at t0 = 0
    for Linear/GVP velocity models and is refused there.
    Unlike the reference, which calls the model once for the drift and again for the score, each
    step evaluates the model once and derives both (same values, half the work).
    """
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"diffusion_form={diffusion_form!r}: expected one of {DIFFUSION_FORMS}")
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step={last_step!r}: expected one of {LAST_STEPS}")
    g = (guidance or Guidance()).replace(
        num_steps=num_steps,
        cfg_scale=cfg_scale,
        cfg_interval_start=cfg_interval_start,
        cfg_channels=cfg_channels,
    )
    transport = transport or Transport()
    if last_step is None:
        last_step_size = 0.0
    t0, t1 = transport.interval(
        sde=True, eval=True, diffusion_form=diffusion_form, last_step_size=last_step_size
    )
    if diffusion_form == "SBDM" and t0 == 0 and transport.path_type != "VP":
        raise ValueError(
            f"diffusion_form='SBDM' is infinite at t=0 on the {transport.path_type} path with "
            f"velocity prediction (sample_eps resolves to 0); use diffusion_form='sigma'"
        )
    graphdef, state, z0, y, scalars, guided = _prepare(model, z0, y, g)
    return _sample_sde(
        graphdef,
        state,
        z0,
        y,
        rng,
        jnp.int32(g.num_steps),
        scalars,
        jnp.float32(diffusion_norm),
        jnp.float32(last_step_size),
        t0=t0,
        t1=t1,
        diffusion_form=diffusion_form,
        last_step=last_step,
        guided=guided,
        cfg_channels=g.cfg_channels,
        transport=transport,
    )


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "t0",
        "t1",
        "diffusion_form",
        "last_step",
        "guided",
        "cfg_channels",
        "transport",
    ),
)
def _sample_sde(
    graphdef,
    state,
    z0,
    y,
    rng,
    num_steps,
    scalars,
    diffusion_norm,
    last_step_size,
    *,
    t0,
    t1,
    diffusion_form,
    last_step,
    guided,
    cfg_channels,
    transport,
):
    f = _drift_fn(
        graphdef, state, y, scalars, guided=guided, cfg_channels=cfg_channels, transport=transport
    )

    def sde_drift(t, x):
        velocity, out = f(t, x)
        tb = jnp.full((x.shape[0],), t, jnp.float32)
        w = transport.diffusion(x, tb, diffusion_form, diffusion_norm)
        return velocity + w * transport.score(out, x, tb), velocity, out, w

    # Reference sde: a uniform grid on [t0, t1] and a constant dt = t[1] - t[0].
    dt = grid_point(1, num_steps, t0, t1, 0.0) - grid_point(0, num_steps, t0, t1, 0.0)

    def em_step(i, x):
        t = grid_point(i, num_steps, t0, t1, 0.0)
        drift, _, _, w = sde_drift(t, x)
        mean_x = x + drift * dt
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
        return mean_x + jnp.sqrt(2 * w) * noise * jnp.sqrt(dt)

    x = jax.lax.fori_loop(0, num_steps - 1, em_step, z0)
    if last_step is None:
        return x
    t_last = jnp.float32(t1)
    drift, velocity, out, _ = sde_drift(t_last, x)
    if last_step == "Mean":
        return x + drift * last_step_size
    if last_step == "Euler":
        return x + velocity * last_step_size
    # Tweedie: E[x1 | x_t] = (x + sigma_t^2 score) / alpha_t
    alpha = transport.alpha(t_last)[0]
    sigma = transport.sigma(t_last)[0]
    return x / alpha + sigma**2 / alpha * transport.score(out, x, jnp.full((x.shape[0],), t_last))
