"""Official VA-VAE PyTorch checkpoints -> our NNX modules: the pure name and layout mapping.

The official `.pt` (reference `vavae/ldm/models/autoencoder.py`, saved by Lightning) is a dict
with `state_dict`, whose keys are LDM names (`encoder.down.0.block.0.norm1.weight`, ...) plus the
training-only groups `loss.*` (logvar, LPIPS, discriminator), `foundation_model.*` (the timm
DINOv2 teacher) and `linear_proj.*` (the VF reverse projection).

Our own formats (export folders written from a `.pt`, trainer run folders) and the one loader of
every tokenizer source, `load_autoencoder`, are in `vavae_jax.checkpoints`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from vavae_jax.model import AutoencoderConfig, AutoencoderKL
from vavae_jax.runtime.torch_names import ConversionError, assign, load_torch_file

log = logging.getLogger(__name__)

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
# Groups of the official checkpoint that are not part of the autoencoder itself.
TRAINING_PREFIXES = ("loss.", "foundation_model.", "linear_proj.", "model_ema.")


def _autoencoder_name(key: str) -> str | None:
    """LDM torch name -> our dotted path (conv `.weight` -> `.kernel`; GroupNorm keeps `weight`)."""
    if not key.startswith(AUTOENCODER_PREFIXES):
        return None
    if key.endswith(".weight") and not _is_norm(key):
        return key[: -len(".weight")] + ".kernel"
    return key


def _is_norm(key: str) -> bool:
    last_module = key.rsplit(".", 2)[-2]
    return last_module.startswith("norm")


def autoencoder_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in state_dict.items() if k.startswith(AUTOENCODER_PREFIXES)}


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], config: AutoencoderConfig, *, rngs: nnx.Rngs | None = None
) -> AutoencoderKL:
    """Builds an `AutoencoderKL` from a PyTorch state dict (names and layouts of the reference).

    Keys of the training-only groups (`loss.*`, `foundation_model.*`, `linear_proj.*`) are left
    for `convert_state_dict` (logged); any other key that is not part of the autoencoder, any missing
    weight and any shape mismatch raises a `ConversionError` listing all of them.
    """
    state_dict = dict(state_dict)
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = dict(state_dict["state_dict"])
    training = sorted(k for k in state_dict if k.startswith(TRAINING_PREFIXES))
    if training:
        groups = sorted({k.split(".", 1)[0] for k in training})
        log.info(
            "from_torch_state_dict: %d keys of %s belong to training state, not the "
            "autoencoder; convert them with vavae_jax.convert.convert_state_dict",
            len(training),
            groups,
        )
    model = AutoencoderKL(config, rngs=rngs or nnx.Rngs(0))
    ae = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_PREFIXES)}
    if not any(k.startswith(AUTOENCODER_PREFIXES) for k in ae):
        raise ConversionError(
            f"no autoencoder weights (keys starting with {AUTOENCODER_PREFIXES}) in this state "
            f"dict; its first keys are {sorted(state_dict)[:8]}. Is it a VA-VAE / LDM "
            f"AutoencoderKL checkpoint?"
        )
    assign(model, ae, _autoencoder_name, what=f"AutoencoderKL({config})", variable_type=nnx.Param)
    return model


# ---------------------------------------------------------------------------------------------
# The whole official checkpoint: every group
# ---------------------------------------------------------------------------------------------
# What a converted checkpoint holds (each may be absent from a checkpoint but the autoencoder).
GROUPS = ("autoencoder", "linear_proj", "logvar", "discriminator", "lpips", "teacher")

_LINEAR_PROJ = "linear_proj."
_LOGVAR = "loss.logvar"
_DISC = "loss.discriminator."
_PERCEPTUAL = "loss.perceptual_loss."
_TEACHER = "foundation_model.model."
# taming `vgg16`: slice K holds torchvision `features` indices [start, stop) under their own index.
_VGG_SLICES = {1: (0, 4), 2: (4, 9), 3: (9, 16), 4: (16, 23), 5: (23, 30)}


def _split_groups(sd: Mapping[str, np.ndarray]) -> tuple[dict[str, dict[str, np.ndarray]], list]:
    """Partitions an official state dict into its groups; returns (groups, unknown keys)."""
    groups: dict[str, dict[str, np.ndarray]] = {
        "autoencoder": {},
        "linear_proj": {},
        "logvar": {},
        "discriminator": {},
        "perceptual_loss": {},
        "teacher": {},
    }
    unknown = []
    for key, value in sd.items():
        if key.startswith(AUTOENCODER_PREFIXES):
            groups["autoencoder"][key] = value
        elif key.startswith(_LINEAR_PROJ):
            groups["linear_proj"][key[len(_LINEAR_PROJ) :]] = value
        elif key == _LOGVAR:
            groups["logvar"][key] = value
        elif key.startswith(_DISC):
            groups["discriminator"][key[len(_DISC) :]] = value
        elif key.startswith(_PERCEPTUAL):
            groups["perceptual_loss"][key[len(_PERCEPTUAL) :]] = value
        elif key.startswith(_TEACHER):
            groups["teacher"][key[len(_TEACHER) :]] = value
        else:
            unknown.append(key)
    return groups, sorted(unknown)


def _linear_proj_kernel(sd: Mapping[str, np.ndarray], embed_dim: int) -> np.ndarray:
    """`linear_proj.weight` [teacher_dim, embed_dim, 1, 1] -> HWIO kernel [1, 1, embed_dim, T]."""
    extra = sorted(set(sd) - {"weight"})
    if extra:
        raise ConversionError(
            f"linear_proj has keys {['linear_proj.' + k for k in extra]}: only the bias-free "
            f"reverse projection z -> teacher width (reverse_proj: true, the released VA-VAE) is "
            f"supported; a checkpoint trained with reverse_proj: false projects the other way"
        )
    w = np.asarray(sd["weight"])
    if w.ndim != 4 or w.shape[1] != embed_dim or w.shape[2:] != (1, 1):
        raise ConversionError(
            f"linear_proj.weight has shape {w.shape}, expected [teacher_dim, {embed_dim}, 1, 1] "
            f"(a 1x1 conv from the {embed_dim} latent channels to the teacher width)"
        )
    return w.transpose(2, 3, 1, 0)


def _discriminator_config(sd: Mapping[str, np.ndarray]):
    """taming NLayerDiscriminator arguments from its state-dict shapes (ndf, n_layers, input_nc)."""
    from vavae_jax.discriminator import DiscriminatorConfig

    if "main.0.weight" not in sd:
        raise ConversionError(
            f"loss.discriminator.* has no main.0.weight (keys: {sorted(sd)[:8]}): not taming's "
            f"NLayerDiscriminator"
        )
    first = np.shape(sd["main.0.weight"])
    n_bn = sum(1 for k in sd if k.endswith(".running_mean"))
    if n_bn < 1:
        raise ConversionError(
            "loss.discriminator.* has no BatchNorm running statistics: an ActNorm "
            "discriminator (use_actnorm=True) is not supported"
        )
    return DiscriminatorConfig(input_nc=int(first[1]), ndf=int(first[0]), n_layers=n_bn)


def _lpips_from_taming(sd: Mapping[str, np.ndarray]):
    """taming LPIPS (`scaling_layer.*`, `net.sliceK.N.*`, `linK.model.1.weight`) -> our LPIPS."""
    from vavae_jax import lpips as lpips_lib

    vgg, heads, problems = {}, {}, []
    for key, value in sd.items():
        parts = key.split(".")
        if key in ("scaling_layer.shift", "scaling_layer.scale"):
            want = lpips_lib.SHIFT if key.endswith("shift") else lpips_lib.SCALE
            got = np.asarray(value, np.float64).reshape(-1)
            if got.shape != (3,) or not np.allclose(got, want, atol=1e-6):
                problems.append(f"{key}={got.tolist()} differs from taming's constants {want}")
        elif parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
            k, idx = int(parts[1][len("slice") :]), int(parts[2])
            lo, hi = _VGG_SLICES.get(k, (0, 0))
            if not lo <= idx < hi:
                problems.append(f"{key}: VGG16 layer {idx} does not belong to slice{k}")
                continue
            vgg[f"features.{idx}.{parts[3]}"] = value
        elif parts[0].startswith("lin"):
            heads[key] = value
        else:
            problems.append(f"{key}: not a taming LPIPS key")
    missing = [k for k in ("scaling_layer.shift", "scaling_layer.scale") if k not in sd]
    if problems or missing:
        raise ConversionError(
            "loss.perceptual_loss.* does not match taming's LPIPS: "
            + "; ".join(problems + [f"missing {k}" for k in missing])
        )
    return lpips_lib.lpips_from_torch_state_dicts(vgg, heads)


def _teacher_config(preset):
    from vavae_jax import foundation

    if isinstance(preset, foundation.Dinov2Config):
        return preset
    if preset not in foundation.PRESETS:
        raise ValueError(
            f"teacher_preset={preset!r}: expected one of {sorted(foundation.PRESETS)} or a "
            f"foundation.Dinov2Config (the reference uses dinov2-large)"
        )
    # The reference's teacher is timm's model: antialiased position-embedding resampling.
    return dataclasses.replace(foundation.PRESETS[preset], interpolate_antialias=True)


def _check_teacher_shapes(sd: Mapping[str, np.ndarray], cfg) -> None:
    """The facts a timm state dict shows about its ViT, against the requested config."""
    facts = {}
    if "pos_embed" in sd:
        facts["hidden_size"] = int(np.shape(sd["pos_embed"])[-1])
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.")}
    if blocks:
        facts["num_hidden_layers"] = max(blocks) + 1
    diff = {f: (v, getattr(cfg, f)) for f, v in facts.items() if v != getattr(cfg, f)}
    if diff:
        raise ConversionError(
            f"foundation_model.model.* is a DINOv2 with {facts}, but the teacher config is "
            f"{cfg}; (checkpoint, config): {diff}. Pass the matching teacher_preset "
            f"(dinov2-small/base/large/giant) or a Dinov2Config"
        )


def convert_state_dict(
    state_dict: Mapping[str, Any],
    config: AutoencoderConfig,
    *,
    teacher_preset="dinov2-large",
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Converts every group of an official VA-VAE state dict; returns our modules and facts.

    Returns {"autoencoder": AutoencoderKL, "linear_proj": kernel [1, 1, embed_dim, T] or None,
    "logvar": float32 scalar or None, "discriminator": NLayerDiscriminator or None,
    "lpips": LPIPS or None, "teacher": Dinov2Model or None, "present": [...], "absent": [...],
    "discriminator_config", "teacher_config"}. Keys outside the known groups raise one
    `ConversionError` listing them; each group's converter is strict about its own keys.
    Groups named in `skip` (e.g. "teacher" when only the generator is wanted) are recognised
    but not converted; they are listed under "skipped" and logged.
    """
    from vavae_jax import discriminator as disc_lib
    from vavae_jax import foundation

    sd = dict(state_dict)
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = dict(sd["state_dict"])
    bad = sorted(k for k, v in sd.items() if not isinstance(v, np.ndarray))
    if bad:
        raise ConversionError(
            f"not a VA-VAE checkpoint: expected the official `.pt`, a dict whose 'state_dict' "
            f"holds tensors (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, loss.*, "
            f"foundation_model.model.*, linear_proj.weight); this one has entries that are not "
            f"tensors: {bad[:10]} (top-level keys {sorted(state_dict)[:10]})"
        )
    groups, unknown = _split_groups(sd)
    if not groups["autoencoder"]:
        raise ConversionError(
            f"not a VA-VAE checkpoint: no autoencoder weights (keys starting with "
            f"{AUTOENCODER_PREFIXES}); expected the official `.pt` (a dict with 'state_dict' "
            f"holding encoder.*, decoder.*, quant_conv.*, post_quant_conv.*, loss.*, "
            f"foundation_model.model.*, linear_proj.weight). Its first keys are {sorted(sd)[:8]}"
        )
    errors: list[str] = []
    if unknown:
        errors.append(
            f"keys outside the known groups of a VA-VAE checkpoint ({len(unknown)}): {unknown}. "
            f"Known: {AUTOENCODER_PREFIXES}, {_LINEAR_PROJ}weight, {_LOGVAR}, {_DISC}*, "
            f"{_PERCEPTUAL}*, {_TEACHER}*"
        )
    out: dict[str, Any] = {"present": [], "absent": [], "skipped": []}
    group_of = {"perceptual_loss": "lpips"}
    for name in list(groups):
        if group_of.get(name, name) in skip and groups[name]:
            out["skipped"].append(group_of.get(name, name))
            groups[name] = {}
    if out["skipped"]:
        log.info("VA-VAE checkpoint: groups recognised, not converted: %s", out["skipped"])
    out.update(dict.fromkeys(GROUPS), discriminator_config=None, teacher_config=None)

    def convert_group(name: str, fn) -> None:
        """Runs one group's strict converter; its problems join the one error raised below."""
        try:
            out[name] = fn()
        except ConversionError as e:
            errors.append(f"[{name}] {e}")

    def discriminator():
        out["discriminator_config"] = _discriminator_config(groups["discriminator"])
        return disc_lib.from_torch_state_dict(groups["discriminator"], out["discriminator_config"])

    def teacher():
        tcfg = _teacher_config(teacher_preset)
        _check_teacher_shapes(groups["teacher"], tcfg)
        out["teacher_config"] = tcfg
        return foundation.from_timm_state_dict(groups["teacher"], tcfg)

    def logvar():
        value = groups["logvar"][_LOGVAR]
        if np.size(value) != 1:
            raise ConversionError(f"{_LOGVAR} has shape {np.shape(value)}, expected a scalar")
        return np.asarray(value, np.float32).reshape(())

    convert_group("autoencoder", lambda: from_torch_state_dict(groups["autoencoder"], config))
    if groups["linear_proj"]:
        convert_group(
            "linear_proj", lambda: _linear_proj_kernel(groups["linear_proj"], config.embed_dim)
        )
    if groups["logvar"]:
        convert_group("logvar", logvar)
    if groups["discriminator"]:
        convert_group("discriminator", discriminator)
    if groups["perceptual_loss"]:
        convert_group("lpips", lambda: _lpips_from_taming(groups["perceptual_loss"]))
    if groups["teacher"]:
        convert_group("teacher", teacher)
    proj, tcfg = out["linear_proj"], out["teacher_config"]
    if proj is not None and tcfg is not None and proj.shape[-1] != tcfg.hidden_size:
        errors.append(
            f"linear_proj projects to {proj.shape[-1]} channels but the teacher is "
            f"{tcfg.hidden_size} wide"
        )
    if errors:
        raise ConversionError(
            "the checkpoint does not match a VA-VAE with " + f"{config}:\n" + "\n".join(errors)
        )
    for name in GROUPS:
        if name not in out["skipped"]:
            (out["present"] if out[name] is not None else out["absent"]).append(name)
    if out["absent"]:
        log.warning("VA-VAE checkpoint: groups absent (not invented): %s", out["absent"])
    return out


def load_official(
    path: str | pathlib.Path,
    config: AutoencoderConfig,
    *,
    skip: tuple[str, ...] = ("discriminator", "lpips", "teacher"),
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """(AutoencoderKL, groups) from an official VA-VAE `.pt`, whose architecture is `config`.

    groups is what `convert_state_dict` returns; the groups in `skip` (the training-only
    modules) are recognised, not converted. Any path (an export folder, a run folder, a `.pt`)
    goes through `vavae_jax.checkpoints.load_autoencoder`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"official VA-VAE checkpoint not found: {path} (folders: "
            f"vavae_jax.checkpoints.load_autoencoder)"
        )
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, expected a dict")
    groups = convert_state_dict(obj, config, skip=skip)
    return groups["autoencoder"], groups
