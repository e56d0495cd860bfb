"""The VA-VAE train step: generator update (both adaptive weights) + discriminator update.

Mirrors the reference `AutoencoderKL.training_step` + `LPIPSWithDiscriminator.forward`
(vavae/ldm/models/autoencoder.py, vavae/ldm/modules/losses/contperceptual.py) in one pure,
jitted function.

How the adaptive weights are computed without extra passes. The reference asks autograd for
d nll / d W and d g / d W at the decoder's last kernel, and d nll / d W and d vf / d W at the
encoder's last kernel, then backpropagates the weighted total. All four are linear pieces of one
backward pass, so we run the forward as a chain of `jax.vjp`s,

    x -enc_body-> h_e -enc_tail-> (mean, logvar) -sample-> z -dec_body-> h_d -dec_tail-> xrec

and pull back the cotangents of the separate losses only as far as each weight needs:
  * nll and g at xrec -> through dec_tail (one conv) -> the GAN weight;
  * both through dec_body in one batched pass (vmap over the two cotangents) -> the decoder's
    parameter grads of each and their cotangents at z;
  * nll and vf at z -> through sample and enc_tail (two convs) -> the VF weight;
  * the weighted sum at z -> one encoder backward pass.
That is one LPIPS, one discriminator, two decoder and one encoder backward pass, against the
reference's two, two, two and one (and it needs no host round trip).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vavae_jax import losses
from vavae_jax import model as model_lib
from vavae_jax.runtime import sharding as _sharding


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The step's settings beside the loss (changing one recompiles). The loss settings are the
    step's `loss` argument, a `losses.LossConfig`: its static fields are read at trace time and
    its stage settings (disc_start, vf_weight, margins) are traced."""

    use_vf: bool
    train_logvar: bool
    lpips_dropout: bool
    ema_decay: float | None
    compute_dtype: Any

    @classmethod
    def from_config(cls, config, compute_dtype) -> StepConfig:
        """From a VA-VAE trainer config (`configs/vavae_f16d32.py`)."""
        return cls(
            use_vf=bool(config.use_vf),
            train_logvar=bool(config.loss.train_logvar),
            lpips_dropout=bool(config.loss.lpips_dropout),
            ema_decay=config.ema.decay if config.ema.enabled else None,
            compute_dtype=compute_dtype,
        )


class Generator(nnx.Module):
    """Everything the generator optimizer updates: the autoencoder, the VF reverse projection
    (reference `linear_proj`, a bias-free 1x1 conv z -> teacher width) and the nll `logvar`."""

    def __init__(
        self,
        ae_config: model_lib.AutoencoderConfig,
        teacher_dim: int | None,
        logvar_init: float,
        *,
        rngs: nnx.Rngs,
    ):
        self.autoencoder = model_lib.AutoencoderKL(ae_config, rngs=rngs)
        if teacher_dim is not None:
            self.linear_proj = nnx.Conv(
                ae_config.embed_dim,
                teacher_dim,
                (1, 1),
                use_bias=False,
                dtype=jnp.dtype(ae_config.dtype),
                param_dtype=jnp.float32,
                kernel_init=_sharding.partitioned(
                    nnx.initializers.lecun_normal(), model_lib.CONV_AXES
                ),
                rngs=rngs,
            )
        self.logvar = nnx.Param(jnp.full((), logvar_init, jnp.float32))


def _tree_add(*trees):
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def _tree_scale(tree, s):
    return jax.tree.map(lambda x: x * s, tree)


def _kernel_grad(grads, path: tuple[str, ...]) -> jax.Array:
    node = grads
    for p in path:
        node = node[p]
    return node.get_value() if isinstance(node, nnx.Variable) else node


def frozen_state(lpips: nnx.Module, teacher: nnx.Module | None) -> dict[str, Any]:
    """The step's `frozen` argument: the states of LPIPS and the teacher ({} without one)."""
    return dict(lpips=nnx.state(lpips), teacher=nnx.state(teacher) if teacher is not None else {})


def make_train_step(
    gen_def: nnx.GraphDef,
    disc_def: nnx.GraphDef,
    lpips: nnx.Module,
    teacher: nnx.Module | None,
    tx_g: optax.GradientTransformation,
    tx_d: optax.GradientTransformation,
    cfg: StepConfig,
):
    """Returns `step(state, frozen, batch, rng, loss, stage_step) -> (state, metrics)`.

    lpips, teacher: the frozen networks (LPIPS and the DINOv2 teacher; `teacher` None without the
            VF loss), real or abstract (`nnx.eval_shape`): only their structure is kept; their
            weights travel in `frozen` (`frozen_state(lpips, teacher)`), so one compiled step
            serves any weights.
    state: dict(gen=Param state, gen_rest=other generator variables, disc=Param state,
                disc_stats=BatchStat state, opt_g, opt_d, step[, ema])
    loss: the `losses.LossConfig`, its stage settings traced (`LossConfig.as_arrays()`), so
          that a stage with other weights, margins or disc_start reuses the compiled step
    stage_step: the iteration within the current stage (int32 scalar); disc_start counts from it
    """
    if cfg.use_vf and teacher is None:
        raise ValueError("make_train_step: StepConfig.use_vf is True but no teacher was given")
    lp_def = nnx.graphdef(lpips)
    t_def = nnx.graphdef(teacher) if cfg.use_vf else None

    def lpips_fn(frozen, a, b, dropout_rng):
        return nnx.merge(lp_def, frozen["lpips"])(a, b, dropout_rng=dropout_rng)

    def teacher_fn(frozen, a):
        return nnx.merge(t_def, frozen["teacher"])(a)

    cdt = cfg.compute_dtype

    def gen_module(params, rest):
        return nnx.merge(gen_def, params, rest)

    def disc_apply(dparams, dstats, x):
        disc = nnx.merge(disc_def, dparams, dstats, copy=True)
        logits = disc(x, train=True)  # the reference's discriminator is always in train mode
        return logits, nnx.state(disc, nnx.BatchStat)

    def step(state, frozen, batch, rng, loss, stage_step):
        if not isinstance(loss, losses.LossConfig):
            raise TypeError(f"train step: loss must be a losses.LossConfig, got {type(loss)}")
        x = batch["image"]  # [B, H, W, 3] in [-1, 1]
        P, rest = state["gen"], state["gen_rest"]
        # The reference compares Lightning's global_step with disc_start. With two manually
        # stepped optimizers (PL 2.4) it advances twice per iteration: it is 2i during the
        # generator loss of iteration i and 2i + 1 during the discriminator loss.
        it = stage_step
        disc_factor = losses.adopt_weight(loss.disc_factor, 2 * it, loss.disc_start)
        rng_sample, rng_lpips = jax.random.split(rng)

        # ---- forward as a chain of VJPs -----------------------------------------------------
        def enc_body(p):
            return gen_module(p, rest).autoencoder.encoder.features(x.astype(cdt))

        h_e, vjp_enc_body = jax.vjp(enc_body, P)

        def enc_tail(p, h):
            ae = gen_module(p, rest).autoencoder
            moments = ae.quant_conv(ae.encoder.conv_out(h)).astype(jnp.float32)
            mean, logvar = jnp.split(moments, 2, axis=-1)
            return mean, jnp.clip(logvar, -30.0, 20.0)

        (mean, logvar), vjp_enc_tail = jax.vjp(enc_tail, P, h_e)
        eps = jax.random.normal(rng_sample, mean.shape, jnp.float32)

        def sample(m, lv):
            return m + jnp.exp(0.5 * lv) * eps

        z, vjp_sample = jax.vjp(sample, mean, logvar)

        def dec_body(p, zz):
            ae = gen_module(p, rest).autoencoder
            return ae.decoder.features(ae.post_quant_conv(zz.astype(cdt)))

        h_d, vjp_dec_body = jax.vjp(dec_body, P, z)

        def dec_tail(p, h):
            return gen_module(p, rest).autoencoder.decoder.conv_out(h).astype(jnp.float32)

        xrec, vjp_dec_tail = jax.vjp(dec_tail, P, h_d)

        # ---- loss heads -----------------------------------------------------------------------
        # The reference's LPIPS heads run with dropout from its first image log on (the logger's
        # pl_module.train() also switches the `.eval()`ed LPIPS back to training mode).
        lpips_rng = rng_lpips if cfg.lpips_dropout else None

        def nll_head(xr, p):
            lv = gen_module(p, rest).logvar[...]
            p_loss = lpips_fn(frozen, x, xr, lpips_rng) if loss.perceptual_weight > 0 else None
            _, weighted, _ = losses.nll_loss(x, xr, lv, p_loss, loss.perceptual_weight)
            return weighted, (p_loss, lv)

        nll_w, vjp_nll, (p_loss, lv) = jax.vjp(nll_head, xrec, P, has_aux=True)
        d_xrec_nll, d_p_logvar = vjp_nll(jnp.ones_like(nll_w))

        def g_head(xr):
            logits, stats = disc_apply(state["disc"], state["disc_stats"], xr)
            return -jnp.mean(logits.astype(jnp.float32)), (logits, stats)

        g_loss, vjp_g, (logits_fake, disc_stats) = jax.vjp(g_head, xrec, has_aux=True)
        (d_xrec_g,) = vjp_g(jnp.ones_like(g_loss))

        kl, vjp_kl = jax.vjp(losses.kl_loss, mean, logvar)

        # ---- GAN adaptive weight at the decoder's last kernel ---------------------------------
        dP_tail_nll, d_hd_nll = vjp_dec_tail(d_xrec_nll)
        dP_tail_g, d_hd_g = vjp_dec_tail(d_xrec_g)
        dec_k = ("autoencoder", "decoder", "conv_out", "kernel")
        if loss.disc_factor > 0:
            d_weight = losses.adaptive_weight(
                _kernel_grad(dP_tail_nll, dec_k),
                _kernel_grad(dP_tail_g, dec_k),
                losses.MAX_D_WEIGHT,
                loss.disc_weight,
            )
        else:
            d_weight = jnp.zeros((), jnp.float32)
        w_g = d_weight * disc_factor

        # ---- decoder backward of nll and g in one batched pass ---------------------------------
        # (Before disc_start w_g is 0 and the g half is wasted; that is ~1% of a real run. A
        # lax.cond to skip it made the whole step 10x slower on XLA:CPU.)
        dPs, dzs = jax.tree.map(
            lambda *a: jnp.stack(a), vjp_dec_body(d_hd_nll), vjp_dec_body(d_hd_g)
        )
        dP_dec = jax.tree.map(lambda a: a[0] + w_g * a[1], dPs)
        dz_nll, dz_g = dzs[0], dzs[1]

        # ---- VF loss and its adaptive weight at the encoder's last kernel ---------------------
        enc_k = ("autoencoder", "encoder", "conv_out", "kernel")
        if cfg.use_vf:
            aux = jax.lax.stop_gradient(teacher_fn(frozen, x))  # [B, h, w, C_teacher]

            def vf_head(p, zz):
                z_proj = gen_module(p, rest).linear_proj(zz.astype(cdt)).astype(jnp.float32)
                vf, _ = losses.vf_loss(
                    z_proj,
                    aux,
                    loss.distmat_margin,
                    loss.cos_margin,
                    loss.distmat_weight,
                    loss.cos_weight,
                )
                return vf, z_proj

            vf, vjp_vf, z_proj = jax.vjp(vf_head, P, z, has_aux=True)
            dP_vf, dz_vf = vjp_vf(jnp.ones_like(vf))
            if loss.adaptive_vf:
                dP_enc_nll, _ = vjp_enc_tail(vjp_sample(dz_nll))
                dP_enc_vf, _ = vjp_enc_tail(vjp_sample(dz_vf))
                vf_weight = losses.adaptive_weight(
                    _kernel_grad(dP_enc_nll, enc_k),
                    _kernel_grad(dP_enc_vf, enc_k),
                    losses.MAX_VF_WEIGHT,
                    loss.vf_weight,
                )
            else:
                vf_weight = jnp.asarray(loss.vf_weight, jnp.float32)
        else:
            aux = z_proj = None
            vf_weight, dP_vf, dz_vf = jnp.zeros((), jnp.float32), None, jnp.zeros_like(z)

        # ---- encoder backward of the weighted total -------------------------------------------
        dz_total = dz_nll + w_g * dz_g + vf_weight * dz_vf
        dm, dlv = vjp_sample(dz_total)
        dm_kl, dlv_kl = vjp_kl(jnp.asarray(loss.kl_weight, jnp.float32))
        dP_enc_tail, d_he = vjp_enc_tail((dm + dm_kl, dlv + dlv_kl))
        (dP_enc_body,) = vjp_enc_body(d_he)
        parts = [dP_enc_body, dP_enc_tail, dP_dec, dP_tail_nll, _tree_scale(dP_tail_g, w_g)]
        if dP_vf is not None:
            parts.append(_tree_scale(dP_vf, vf_weight))
        if cfg.train_logvar:
            parts.append(d_p_logvar)
        grads_g = _tree_add(*parts)
        if not cfg.train_logvar:
            grads_g = _zero_logvar(grads_g)

        # The reported total and terms come from the library's generator-loss function on the
        # same pieces; its gradient is the sum assembled above.
        total, terms = losses.generator_loss(
            x,
            xrec,
            mean,
            logvar,
            lv,
            p_loss,
            logits_fake,
            z_proj,
            aux,
            d_weight,
            vf_weight if (cfg.use_vf and loss.adaptive_vf) else None,
            2 * it,
            loss,
        )
        updates, opt_g = tx_g.update(grads_g, state["opt_g"], P)
        new_P = optax.apply_updates(P, updates)

        # ---- discriminator step on the same (pre-update) reconstructions --------------------
        xrec_sg = jax.lax.stop_gradient(xrec)

        def d_loss_fn(dparams):
            logits_real, stats = disc_apply(dparams, disc_stats, x)
            logits_fake_d, stats = disc_apply(dparams, stats, xrec_sg)
            d_loss, d_terms = losses.discriminator_loss(
                logits_real, logits_fake_d, 2 * it + 1, loss
            )
            return d_loss, (d_terms, stats)

        (_, (d_terms, disc_stats)), grads_d = jax.value_and_grad(d_loss_fn, has_aux=True)(
            state["disc"]
        )
        d_updates, opt_d = tx_d.update(grads_d, state["opt_d"], state["disc"])
        new_disc = optax.apply_updates(state["disc"], d_updates)

        new_state = dict(
            state,
            gen=new_P,
            disc=new_disc,
            disc_stats=disc_stats,
            opt_g=opt_g,
            opt_d=opt_d,
            step=state["step"] + 1,
        )
        if cfg.ema_decay is not None:
            new_state["ema"] = optax.incremental_update(new_P, state["ema"], 1.0 - cfg.ema_decay)

        metrics = {
            **{f"train/{k}": v for k, v in terms.items()},
            **{f"train/{k}": v for k, v in d_terms.items()},
            "train/grad_norm_g": optax.tree.norm(grads_g),
            "train/grad_norm_d": optax.tree.norm(grads_d),
            "train/param_norm_g": optax.tree.norm(new_P),  # after the update: NaN guard
        }
        return new_state, metrics

    return step


def _zero_logvar(grads):
    """The reference's optimizer omits `loss.logvar`: keep it at its initial value."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g: (
            jnp.zeros_like(g) if any(getattr(k, "key", None) == "logvar" for k in path) else g
        ),
        grads,
    )
