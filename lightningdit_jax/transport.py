"""Flow-matching transport of LightningDiT (SiT's interpolants), as pure JAX functions.

Ported from the reference `transport/path.py` (ICPlan = Linear, GVPCPlan, VPCPlan),
`transport/transport.py` (Transport.sample, training_losses, get_drift, get_score) and
`transport/__init__.py` (create_transport's eps defaults).

Time convention (the reference's): t = 0 is noise, t = 1 is data,
  x_t = alpha_t * x1 + sigma_t * x0,  x0 ~ N(0, I);  Linear: alpha_t = t, sigma_t = 1 - t,
and a velocity model learns u_t = d_alpha_t * x1 + d_sigma_t * x0 (Linear: x1 - x0).
LightningDiT trains the Linear path with velocity prediction, logit-normal t (t = sigmoid(n),
n ~ N(0, 1)) and loss = mean((v - u)^2) + mean(1 - cos(v, u)), the cosine taken over channels at
each position (reference `F.cosine_similarity(..., dim=1)` on NCHW).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

PATH_TYPES = ("Linear", "GVP", "VP")
PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
DIFFUSION_FORMS = (
    "constant",
    "SBDM",
    "sigma",
    "linear",
    "decreasing",
    "increasing-decreasing",
)


def _bcast(t, x):
    """[B] -> [B, 1, 1, 1] (or a scalar as is) to broadcast against x [B, ...]."""
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim)) if t.ndim else t


@dataclasses.dataclass(frozen=True)
class Transport:
    """Field names follow the reference YAML `transport:` section; defaults are its values
    for LightningDiT (configs/lightningdit_xl_vavae_f16d32.yaml)."""

    path_type: str = "Linear"
    prediction: str = "velocity"
    loss_weight: str | None = None
    train_eps: float | None = None
    sample_eps: float | None = None
    use_cosine_loss: bool = True
    use_lognorm: bool = True
    # VP path constants (reference VPCPlan defaults).
    sigma_min: float = 0.1
    sigma_max: float = 20.0

    def __post_init__(self):
        if self.path_type not in PATH_TYPES:
            raise ValueError(f"path_type={self.path_type!r}: expected one of {PATH_TYPES}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction={self.prediction!r}: expected one of {PREDICTIONS}")
        if self.loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"loss_weight={self.loss_weight!r}: expected one of {LOSS_WEIGHTS}")

    # -- eps defaults of create_transport ------------------------------------------------------
    @property
    def eps(self) -> tuple[float, float]:
        """(train_eps, sample_eps) as `create_transport` resolves them.

        VP: 1e-5 / 1e-3 unless given. Linear/GVP with noise or score prediction: 1e-3 / 1e-3
        unless given. Linear/GVP with velocity: 0 / 0 whatever is given ("stable everywhere").
        (The reference tests `train_eps is None` for the sample_eps default, a typo; here each
        default depends on its own argument. Equal when neither is given.)
        """
        if self.path_type == "VP":
            return (
                1e-5 if self.train_eps is None else self.train_eps,
                1e-3 if self.sample_eps is None else self.sample_eps,
            )
        if self.prediction != "velocity":
            return (
                1e-3 if self.train_eps is None else self.train_eps,
                1e-3 if self.sample_eps is None else self.sample_eps,
            )
        return 0.0, 0.0

    def interval(
        self,
        *,
        sde: bool = False,
        eval: bool = False,
        diffusion_form: str = "SBDM",
        last_step_size: float = 0.0,
    ) -> tuple[float, float]:
        """Reference `Transport.check_interval` (forward time): the [t0, t1] to train/sample on."""
        t0, t1 = 0.0, 1.0
        eps = self.eps[1] if eval else self.eps[0]
        if self.path_type == "VP":
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        elif self.prediction != "velocity" or sde:
            t0 = eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 0
            t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
        return float(t0), float(t1)

    # -- the path (reference path.py) -----------------------------------------------------------
    def _log_mean_coeff(self, t):
        d = self.sigma_max - self.sigma_min
        return -0.25 * (1 - t) ** 2 * d - 0.5 * (1 - t) * self.sigma_min

    def _d_log_mean_coeff(self, t):
        return 0.5 * (1 - t) * (self.sigma_max - self.sigma_min) + 0.5 * self.sigma_min

    def alpha(self, t):
        """(alpha_t, d alpha_t / dt): the coefficient of x1 (data)."""
        if self.path_type == "Linear":
            return t, jnp.ones_like(t)
        if self.path_type == "GVP":
            return jnp.sin(t * math.pi / 2), math.pi / 2 * jnp.cos(t * math.pi / 2)
        a = jnp.exp(self._log_mean_coeff(t))
        return a, a * self._d_log_mean_coeff(t)

    def sigma(self, t):
        """(sigma_t, d sigma_t / dt): the coefficient of x0 (noise)."""
        if self.path_type == "Linear":
            return 1 - t, -jnp.ones_like(t)
        if self.path_type == "GVP":
            return jnp.cos(t * math.pi / 2), -math.pi / 2 * jnp.sin(t * math.pi / 2)
        p = 2 * self._log_mean_coeff(t)
        s = jnp.sqrt(1 - jnp.exp(p))
        return s, jnp.exp(p) * (2 * self._d_log_mean_coeff(t)) / (-2 * s)

    def d_alpha_alpha_ratio(self, t):
        if self.path_type == "Linear":
            return 1 / t
        if self.path_type == "GVP":
            return math.pi / (2 * jnp.tan(t * math.pi / 2))
        return self._d_log_mean_coeff(t)

    def drift_and_diffusion(self, x, t):
        """Reference `compute_drift`: (drift_mean, drift_var) of the SDE in score form."""
        t = _bcast(t, x)
        if self.path_type == "VP":
            beta = self.sigma_min + (1 - t) * (self.sigma_max - self.sigma_min)
            return -0.5 * beta * x, beta / 2
        ratio = self.d_alpha_alpha_ratio(t)
        sigma_t, d_sigma_t = self.sigma(t)
        return -ratio * x, ratio * sigma_t**2 - sigma_t * d_sigma_t

    def diffusion(self, x, t, form: str = "SBDM", norm: float = 1.0):
        """Reference `compute_diffusion`: the diffusion coefficient w_t of the sampling SDE."""
        tb = _bcast(t, x)
        if form == "constant":
            return jnp.full_like(tb, norm)
        if form == "SBDM":
            return norm * self.drift_and_diffusion(x, t)[1]
        if form == "sigma":
            return norm * self.sigma(tb)[0]
        if form == "linear":
            return norm * (1 - tb)
        if form == "decreasing":
            return 0.25 * (norm * jnp.cos(math.pi * tb) + 1) ** 2
        if form == "increasing-decreasing":
            return norm * jnp.sin(math.pi * tb) ** 2
        raise ValueError(f"diffusion_form={form!r}: expected one of {DIFFUSION_FORMS}")

    def plan(self, t, x0, x1):
        """(x_t, u_t): the point on the path and its velocity (reference `ICPlan.plan`)."""
        tb = _bcast(t, x1)
        a, da = self.alpha(tb)
        s, ds = self.sigma(tb)
        return a * x1 + s * x0, da * x1 + ds * x0

    # -- model output -> velocity / score (reference get_drift, get_score) -------------------
    def velocity(self, model_out, x, t):
        """The probability-flow ODE drift for a model output at (x, t)."""
        if self.prediction == "velocity":
            return model_out
        drift_mean, drift_var = self.drift_and_diffusion(x, t)
        if self.prediction == "score":
            return -drift_mean + drift_var * model_out
        score = model_out / -self.sigma(_bcast(t, x))[0]
        return -drift_mean + drift_var * score

    def score(self, model_out, x, t):
        """grad log p_t(x) for a model output at (x, t)."""
        tb = _bcast(t, x)
        if self.prediction == "score":
            return model_out
        if self.prediction == "noise":
            return model_out / -self.sigma(tb)[0]
        # ICPlan.get_score_from_velocity
        a, da = self.alpha(tb)
        s, ds = self.sigma(tb)
        reverse_ratio = a / da
        var = s**2 - reverse_ratio * ds * s
        return (reverse_ratio * model_out - x) / var

    # -- training ------------------------------------------------------------------------------
    def sample_t(self, rng: jax.Array, batch: int) -> jax.Array:
        """[B] times: sigmoid(N(0, 1)) (use_lognorm) or U(0, 1), mapped to the train interval."""
        t0, t1 = self.interval()
        if self.use_lognorm:
            u = jax.nn.sigmoid(jax.random.normal(rng, (batch,), jnp.float32))
        else:
            u = jax.random.uniform(rng, (batch,), jnp.float32)
        return u * (t1 - t0) + t0


def cosine_similarity(a, b, axis: int = -1, eps: float = 1e-8):
    """torch.nn.functional.cosine_similarity: each vector divided by max(norm, eps)."""
    # Clamp the squared norm before the square root: the same values as max(norm, eps), and a
    # finite gradient at a zero vector (jnp.linalg.norm's is NaN there), which is exactly where a
    # freshly initialised LightningDiT starts (its output layer is zero).
    na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis, keepdims=True), eps * eps))
    nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=axis, keepdims=True), eps * eps))
    return jnp.sum((a / na) * (b / nb), axis=axis)


def training_loss(
    model,
    x1: jax.Array,
    y: jax.Array,
    rng: jax.Array,
    *,
    transport: Transport | None = None,
    train: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one batch: reference `Transport.training_losses` plus train.py's reduction.

    x1 [B, H, W, C] normalised latents (data), y [B] labels. Draws x0, t and the label dropout from
    `rng`. Returns (loss, terms) with float32 scalars: `mse` (the velocity / noise / score loss),
    `cos` (1 - cosine, velocity with use_cosine_loss) and `loss` = their sum, as train.py
    optimises it.
    """
    transport = transport or Transport()
    k_noise, k_t, k_drop = jax.random.split(rng, 3)
    x1 = x1.astype(jnp.float32)
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
    t = transport.sample_t(k_t, x1.shape[0])
    return loss_at(model, x1, x0, t, y, transport=transport, train=train, rng=k_drop)


def loss_at(
    model,
    x1: jax.Array,
    x0: jax.Array,
    t: jax.Array,
    y: jax.Array,
    *,
    transport: Transport | None = None,
    train: bool = False,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`training_loss` at given noise x0 [B, H, W, C] and times t [B] (a validation loss on a
    fixed grid and noise: the same value for every evaluation). `rng`: the label dropout's, for
    train=True."""
    transport = transport or Transport()
    x1 = x1.astype(jnp.float32)
    xt, ut = transport.plan(t, x0, x1)
    out = model(xt, t, y, train=train, rng=rng).astype(jnp.float32)
    if out.shape != xt.shape:
        raise ValueError(f"model output {out.shape} does not match its input {xt.shape}")
    terms = {}
    if transport.prediction == "velocity":
        terms["mse"] = jnp.mean((out - ut) ** 2)
        if transport.use_cosine_loss:
            terms["cos"] = jnp.mean(1 - cosine_similarity(out, ut, axis=-1))
    else:
        tb = _bcast(t, xt)
        _, drift_var = transport.drift_and_diffusion(xt, t)
        sigma_t = transport.sigma(tb)[0]
        if transport.loss_weight == "velocity":
            weight = (drift_var / sigma_t) ** 2
        elif transport.loss_weight == "likelihood":
            weight = drift_var / sigma_t**2
        else:
            weight = 1.0
        if transport.prediction == "noise":
            terms["mse"] = jnp.mean(weight * (out - x0) ** 2)
        else:
            terms["mse"] = jnp.mean(weight * (out * sigma_t + x0) ** 2)
    loss = sum(terms.values())
    terms["loss"] = loss
    return loss, terms
