"""The VA-VAE losses as pure functions: nll with a learned scalar logvar, KL, VF, GAN and weights.

Ported from the reference `vavae/ldm/modules/losses/contperceptual.py` (LPIPSWithDiscriminator)
and taming's `taming/modules/losses/vqperceptual.py` (adopt_weight, hinge_d_loss,
vanilla_d_loss). Images and features are NHWC; every loss is computed in float32.

The adaptive weights need gradients of partial losses with respect to one kernel; those are the
caller's (the train step's) business. `adaptive_weight` turns two such gradients into the weight.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array

# Denominator floor of the adaptive weights (reference calculate_adaptive_weight[_vf]).
ADAPTIVE_EPS = 1e-4
# Clamps of the two adaptive weights (reference: 1e4 for the GAN weight, 1e8 for the VF weight).
MAX_D_WEIGHT = 1e4
MAX_VF_WEIGHT = 1e8
# torch.nn.functional.normalize and cosine_similarity defaults, used by the reference VF loss.
NORMALIZE_EPS = 1e-12
COSINE_EPS = 1e-8


# The settings that may change between training stages without recompiling the step: traced
# leaves of `LossConfig` (a pytree). Every other field is static: changing one recompiles.
TRACED_FIELDS = ("disc_start", "vf_weight", "distmat_margin", "cos_margin")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the reference `LPIPSWithDiscriminator` (same names): the one form of
    the VA-VAE loss settings, from the config file (`from_config(config.loss)`) to the step.

    A pytree: `TRACED_FIELDS` (disc_start, vf_weight, distmat_margin, cos_margin) are its leaves,
    so a training stage that changes them passes a new `LossConfig` to the same compiled step
    (`as_arrays()` gives the leaves the step's dtypes); the other fields are static.

    Defaults are those of the VA-VAE config `vavae/configs/f16d32_vfdinov2.yaml` (the class
    defaults of the reference fill the fields that file leaves out).
    `pixelloss_weight` is kept for parity with the reference's arguments: the reference stores it
    and never uses it (the L1 term has weight 1), and neither do we.
    """

    disc_start: int = 5001
    kl_weight: float = 1e-6
    pixelloss_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    disc_loss: str = "hinge"
    vf_weight: float = 0.1
    adaptive_vf: bool = True
    distmat_margin: float = 0.25
    cos_margin: float = 0.5
    distmat_weight: float = 1.0
    cos_weight: float = 1.0

    def __post_init__(self):
        if self.disc_loss not in D_LOSSES:
            raise ValueError(
                f"LossConfig.disc_loss={self.disc_loss!r}: expected one of {sorted(D_LOSSES)}"
            )

    @classmethod
    def from_config(cls, loss_config: Any) -> LossConfig:
        """The fields of this class read from a mapping with the same names (the config file's
        `config.loss`, which also holds the discriminator's shape and the logvar settings)."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in loss_config]
        if missing:
            raise ValueError(f"LossConfig.from_config: the loss config lacks {missing}")
        return cls(**{n: loss_config[n] for n in names})

    def as_arrays(self) -> LossConfig:
        """The same settings with the traced fields as arrays of the step's dtypes (int32
        disc_start, float32 weights and margins), so every stage feeds the compiled step alike."""
        return dataclasses.replace(
            self,
            disc_start=jnp.asarray(self.disc_start, jnp.int32),
            vf_weight=jnp.asarray(self.vf_weight, jnp.float32),
            distmat_margin=jnp.asarray(self.distmat_margin, jnp.float32),
            cos_margin=jnp.asarray(self.cos_margin, jnp.float32),
        )


jax.tree_util.register_dataclass(
    LossConfig,
    data_fields=list(TRACED_FIELDS),
    meta_fields=[f.name for f in dataclasses.fields(LossConfig) if f.name not in TRACED_FIELDS],
)


# ---------------------------------------------------------------------------------------------
# Reconstruction and KL
# ---------------------------------------------------------------------------------------------
def _check_images(x: Array, xrec: Array, what: str) -> None:
    if not hasattr(x, "shape") or not hasattr(xrec, "shape") or x.ndim != 4:
        raise ValueError(
            f"{what}: expected images [B, H, W, C] (NHWC), got {getattr(x, 'shape', type(x))} "
            f"and {getattr(xrec, 'shape', type(xrec))}"
        )
    if x.shape != xrec.shape:
        raise ValueError(
            f"{what}: inputs {x.shape} and reconstructions {xrec.shape} differ in shape; both "
            f"must be [B, H, W, C] (NHWC)"
        )


def kl_loss(mean: Array, logvar: Array) -> Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed per sample, averaged over the batch: a scalar.

    Reference: `posteriors.kl()` (DiagonalGaussianDistribution.kl, a sum over C, H, W) followed by
    `torch.sum(kl_loss) / kl_loss.shape[0]`. `logvar` is the posterior's, already clamped to
    [-30, 20] (`DiagonalGaussian.from_moments`).
    """
    if not hasattr(mean, "shape") or mean.ndim < 1 or mean.shape != logvar.shape:
        raise ValueError(
            f"kl_loss: mean {getattr(mean, 'shape', type(mean))} and logvar "
            f"{getattr(logvar, 'shape', type(logvar))} must have the same shape [B, h, w, C]"
        )
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * jnp.sum(
        jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim))
    )
    return jnp.sum(kl) / mean.shape[0]


def nll_loss(
    x: Array,
    xrec: Array,
    logvar: Array | float,
    p_loss: Array | float | None,
    perceptual_weight: float,
    weights: Array | None = None,
) -> tuple[Array, Array, Array]:
    """Returns (nll_loss, weighted_nll_loss, rec_loss) of the reference (pp_style=False).

    rec = |x - xrec| + perceptual_weight * p_loss          # [B, H, W, C]
    nll = rec / exp(logvar) + logvar                        # logvar: one learned scalar
    nll_loss = sum(nll) / B; weighted_nll_loss = sum(weights * nll) / B; rec_loss = mean(rec)

    x, xrec: [B, H, W, C]; p_loss: LPIPS per sample [B, 1, 1, 1] (or a scalar; ignored when
    perceptual_weight is 0 as in the reference); weights: broadcastable to nll or None.
    """
    _check_images(x, xrec, "nll_loss")
    x, xrec = x.astype(jnp.float32), xrec.astype(jnp.float32)
    b = x.shape[0]
    rec = jnp.abs(x - xrec)
    static_off = isinstance(perceptual_weight, numbers.Number) and perceptual_weight <= 0
    if not static_off:
        if p_loss is None:
            raise ValueError(
                f"nll_loss: perceptual_weight={perceptual_weight} but p_loss is None; pass the "
                f"LPIPS values [B, 1, 1, 1] or set perceptual_weight to 0"
            )
        p_loss = jnp.asarray(p_loss, jnp.float32)
        # A [B] vector would broadcast against the channel axis; insist on the reference's shape.
        if p_loss.shape not in ((), (b, 1, 1, 1)):
            raise ValueError(
                f"nll_loss: p_loss has shape {p_loss.shape}; expected [B, 1, 1, 1] = "
                f"{(b, 1, 1, 1)} (LPIPS per sample) or a scalar"
            )
        rec = rec + perceptual_weight * p_loss
    logvar = jnp.asarray(logvar, jnp.float32)
    if logvar.shape != ():
        raise ValueError(
            f"nll_loss: logvar must be a scalar (one learned value), got {logvar.shape}"
        )
    nll = rec / jnp.exp(logvar) + logvar
    weighted = nll if weights is None else jnp.asarray(weights, jnp.float32) * nll
    return jnp.sum(nll) / b, jnp.sum(weighted) / b, jnp.mean(rec)


# ---------------------------------------------------------------------------------------------
# VF loss (the paper's vision-foundation alignment)
# ---------------------------------------------------------------------------------------------
def _l2_normalize(x: Array, eps: float) -> Array:
    """torch.nn.functional.normalize over the last axis: x / max(||x||, eps)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def vf_loss(
    z_proj: Array,
    aux_feature: Array,
    distmat_margin: float | Array,
    cos_margin: float | Array,
    distmat_weight: float = 1.0,
    cos_weight: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Marginal distance-matrix + marginal cosine similarity loss (reference forward, VF part).

    z_proj: the latent after the 1x1 reverse projection, [B, h, w, C_teacher];
    aux_feature: the teacher's patch features on the same grid, [B, h, w, C_teacher].
    Tokens are the h*w positions; similarities are over channels.
      distmat = mean_{b,i,j} relu(|cos(z_i, z_j) - cos(f_i, f_j)| - distmat_margin)
      cos     = mean_{b,i}   relu(1 - cos_margin - cos(f_i, z_i))
      vf      = distmat_weight * distmat + cos_weight * cos
    The similarity matrices use F.normalize (eps 1e-12), the per-token cosine uses
    F.cosine_similarity (each norm clamped at 1e-8), as the reference.
    """
    if not hasattr(z_proj, "shape") or z_proj.ndim != 4 or z_proj.shape != aux_feature.shape:
        raise ValueError(
            f"vf_loss: z_proj {getattr(z_proj, 'shape', type(z_proj))} and aux_feature "
            f"{getattr(aux_feature, 'shape', type(aux_feature))} must both be [B, h, w, C] with "
            f"the same shape: project z to the teacher width and match the teacher's token grid"
        )
    b, h, w, c = z_proj.shape
    z = z_proj.astype(jnp.float32).reshape(b, h * w, c)
    f = aux_feature.astype(jnp.float32).reshape(b, h * w, c)

    zn, fn = _l2_normalize(z, NORMALIZE_EPS), _l2_normalize(f, NORMALIZE_EPS)
    hi = jax.lax.Precision.HIGHEST  # the margins act on these values: no TF32 / bf16 passes
    z_sim = jnp.einsum("bic,bjc->bij", zn, zn, precision=hi)  # [B, hw, hw]
    f_sim = jnp.einsum("bic,bjc->bij", fn, fn, precision=hi)
    distmat = jnp.mean(jax.nn.relu(jnp.abs(z_sim - f_sim) - distmat_margin))

    zc, fc = _l2_normalize(z, COSINE_EPS), _l2_normalize(f, COSINE_EPS)
    cos = jnp.sum(fc * zc, axis=-1)  # [B, hw]
    cos_term = jnp.mean(jax.nn.relu(1.0 - cos_margin - cos))

    vf = distmat * distmat_weight + cos_term * cos_weight
    return vf, {"vf_distmat": distmat, "vf_cos": cos_term}


# ---------------------------------------------------------------------------------------------
# GAN
# ---------------------------------------------------------------------------------------------
def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x'))))  (taming vqperceptual.py)."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def vanilla_d_loss(logits_real: Array, logits_fake: Array) -> Array:
    """0.5 * (mean(softplus(-D(x))) + mean(softplus(D(x'))))  (taming vqperceptual.py)."""
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adopt_weight(weight, step, threshold, value=0.0):
    """`value` before `threshold` steps, `weight` from then on (taming adopt_weight).

    With Python numbers it returns a Python number (as the reference); with a traced step or
    threshold a float32 array.
    """
    if all(isinstance(v, numbers.Number) for v in (weight, step, threshold, value)):
        return value if step < threshold else weight
    return jnp.where(jnp.asarray(step) < threshold, value, weight).astype(jnp.float32)


def _global_norm(tree: Any) -> Array:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("adaptive_weight: got an empty gradient")
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))


def adaptive_weight(grad_a: Any, grad_b: Any, max_value: float, scale: float | Array) -> Array:
    """clip(||grad_a|| / (||grad_b|| + 1e-4), 0, max_value) * scale, without a gradient.

    Reference calculate_adaptive_weight (grad_a = d nll / d W_dec_last, grad_b = d g / d W_dec_last,
    max 1e4, scale disc_weight) and calculate_adaptive_weight_vf (d nll / d W_enc_last,
    d vf / d W_enc_last, max 1e8, scale vf_weight). Norms are Frobenius (torch.norm); the gradients
    may be arrays or pytrees (then the norm is over all leaves).
    """
    ratio = _global_norm(grad_a) / (_global_norm(grad_b) + ADAPTIVE_EPS)
    ratio = jax.lax.stop_gradient(jnp.clip(ratio, 0.0, max_value))
    return ratio * jnp.asarray(scale, jnp.float32)


def _scalar(v) -> Array:
    return jnp.asarray(v, jnp.float32)


def _check_cfg(cfg, what: str) -> None:
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"{what}: cfg must be a losses.LossConfig, got {type(cfg).__name__}")


def generator_loss(
    inputs: Array,
    reconstructions: Array,
    posterior_mean: Array,
    posterior_logvar: Array,
    logvar: Array | float,
    p_loss: Array | None,
    logits_fake: Array,
    z_proj: Array | None,
    aux_feature: Array | None,
    d_weight: Array | float,
    vf_weight: Array | float | None,
    global_step,
    cfg: LossConfig,
) -> tuple[Array, dict[str, Array]]:
    """The reference's generator loss (optimizer_idx 0) from already computed pieces.

    total = weighted_nll + kl_weight * kl + d_weight * disc_factor * g_loss + vf_weight * vf
    with g_loss = -mean(D(xrec)) and disc_factor = adopt_weight(disc_factor, step, disc_start).

    inputs, reconstructions: [B, H, W, C]; posterior_mean / posterior_logvar: [B, h, w, C_z];
    logvar: the learned scalar; p_loss: LPIPS [B, 1, 1, 1]; logits_fake: D(reconstructions);
    z_proj, aux_feature: [B, h, w, C_teacher] or both None (no VF term, the plain LDM loss).
    d_weight: the adaptive GAN weight (already times disc_weight; `adaptive_weight`), used only
    when cfg.disc_factor > 0 as in the reference. vf_weight: the adaptive VF weight (already times
    cfg.vf_weight) when cfg.adaptive_vf; None otherwise (the constant cfg.vf_weight is used).
    Returns (total, terms) with every term as a float32 scalar for logging.
    """
    _check_cfg(cfg, "generator_loss")
    nll, weighted_nll, rec = nll_loss(
        inputs, reconstructions, logvar, p_loss, cfg.perceptual_weight
    )
    kl = kl_loss(posterior_mean, posterior_logvar)
    g_loss = -jnp.mean(logits_fake.astype(jnp.float32))
    d_weight = _scalar(d_weight) if cfg.disc_factor > 0.0 else jnp.zeros((), jnp.float32)
    disc_factor = _scalar(adopt_weight(cfg.disc_factor, global_step, cfg.disc_start))
    total = weighted_nll + cfg.kl_weight * kl + d_weight * disc_factor * g_loss
    terms = {
        "nll_loss": nll,
        "weighted_nll_loss": weighted_nll,
        "rec_loss": rec,
        "kl_loss": kl,
        "g_loss": g_loss,
        "d_weight": d_weight,
        "disc_factor": disc_factor,
        "logvar": _scalar(logvar),
    }
    if (z_proj is None) != (aux_feature is None):
        raise ValueError(
            "generator_loss: pass both z_proj and aux_feature for the VF loss, or neither"
        )
    if z_proj is not None:
        vf, vf_terms = vf_loss(
            z_proj,
            aux_feature,
            cfg.distmat_margin,
            cfg.cos_margin,
            cfg.distmat_weight,
            cfg.cos_weight,
        )
        if cfg.adaptive_vf:
            if vf_weight is None:
                raise ValueError(
                    "generator_loss: cfg.adaptive_vf is True, so pass the adaptive vf_weight "
                    "(adaptive_weight(d nll/dW_enc, d vf/dW_enc, MAX_VF_WEIGHT, cfg.vf_weight))"
                )
            vf_weight = _scalar(vf_weight)
        else:
            if vf_weight is not None:
                raise ValueError(
                    "generator_loss: cfg.adaptive_vf is False, so the VF weight is the constant "
                    "cfg.vf_weight; pass vf_weight=None"
                )
            vf_weight = _scalar(cfg.vf_weight)
        total = total + vf_weight * vf
        terms.update(vf_loss=vf, vf_weight=vf_weight, **vf_terms)
    terms["total_loss"] = total
    return total, terms


def discriminator_loss(
    logits_real: Array, logits_fake: Array, global_step, cfg: LossConfig
) -> tuple[Array, dict[str, Array]]:
    """The reference's discriminator loss (optimizer_idx 1): disc_factor * d_loss(real, fake).

    logits_fake must come from stop_gradient(reconstructions). Returns (loss, terms) with the
    reference's log entries: disc_loss, logits_real, logits_fake (means).
    """
    _check_cfg(cfg, "discriminator_loss")
    if logits_real.shape != logits_fake.shape:
        raise ValueError(
            f"discriminator_loss: logits_real {logits_real.shape} and logits_fake "
            f"{logits_fake.shape} differ; both come from the same discriminator on same-size images"
        )
    disc_factor = _scalar(adopt_weight(cfg.disc_factor, global_step, cfg.disc_start))
    loss = disc_factor * D_LOSSES[cfg.disc_loss](logits_real, logits_fake)
    terms = {
        "disc_loss": loss,
        "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
        "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
    }
    return loss, terms
