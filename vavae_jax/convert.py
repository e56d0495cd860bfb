"""Official VA-VAE PyTorch checkpoints -> our NNX modules and Orbax checkpoints.

The official `.pt` (reference `vavae/ldm/models/autoencoder.py`, saved by Lightning) is a dict
with `state_dict`, whose keys are LDM names (`encoder.down.0.block.0.norm1.weight`, ...) plus the
training-only groups `loss.*` (logvar, LPIPS, discriminator), `foundation_model.*` (the timm
DINOv2 teacher) and `linear_proj.*` (the VF reverse projection).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vavae_jax.model import AutoencoderConfig, AutoencoderKL
from vavae_jax.runtime.torch_names import ConversionError, assign, flat_params, load_torch_file

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
    for `convert_official` (logged); any other key that is not part of the autoencoder, any missing
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
            "autoencoder; convert them with vavae_jax.convert.convert_official",
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
# The whole official checkpoint -> our export directory
# ---------------------------------------------------------------------------------------------
EXPORT_FORMAT = "vavae_jax.export/v1"
EXPORT_JSON = "vavae_export.json"
STATE_DIR = "state"  # Orbax checkpoint of the array pytree, under the export directory
LPIPS_FILE = "lpips.npz"
# What a converted checkpoint holds (each may be absent from a checkpoint but the autoencoder).
GROUPS = ("autoencoder", "linear_proj", "logvar", "discriminator", "lpips", "teacher")

_LINEAR_PROJ = "linear_proj."
_LOGVAR = "loss.logvar"
_DISC = "loss.discriminator."
_PERCEPTUAL = "loss.perceptual_loss."
_TEACHER = "foundation_model.model."
# taming `vgg16`: slice K holds torchvision `features` indices [start, stop) under their own index.
_VGG_SLICES = {1: (0, 4), 2: (4, 9), 3: (9, 16), 4: (16, 23), 5: (23, 30)}
# Fields that change the parameters (dtype may differ between an export and its use).
AUTOENCODER_ARCH_FIELDS = tuple(
    f.name for f in dataclasses.fields(AutoencoderConfig) if f.name != "dtype"
)


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


def _flat_arrays(module: nnx.Module, variable_type=nnx.Variable) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.get_value()) for k, v in flat_params(module, variable_type).items()}


def _nest(flat: Mapping[str, Any]) -> dict:
    """{"a.b.0.c": x} -> {"a": {"b": {"0": {"c": x}}}} (string keys only, for Orbax)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


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


def convert_official(
    pt_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config: AutoencoderConfig,
    *,
    teacher_preset="dinov2-large",
) -> pathlib.Path:
    """The official VA-VAE `.pt` -> our export directory (read back with `load_export`).

    `out_dir/state/` Orbax checkpoint of {autoencoder, linear_proj?, logvar?, discriminator?,
    teacher?} (dotted names as nested dicts), `out_dir/lpips.npz` (vavae_jax.lpips format) when
    the perceptual loss is in the checkpoint, and `out_dir/vavae_export.json` (configs, teacher
    width, which groups were present / absent, the source file).
    """
    import orbax.checkpoint as ocp

    from vavae_jax import lpips as lpips_lib

    pt_path = pathlib.Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"VA-VAE checkpoint not found: {pt_path}")
    out_dir = pathlib.Path(out_dir).resolve()
    if (out_dir / STATE_DIR).exists() or (out_dir / EXPORT_JSON).exists():
        raise FileExistsError(f"{out_dir} already holds an export; choose a new --out or delete it")
    obj = load_torch_file(pt_path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{pt_path} holds a {type(obj).__name__}, expected a dict")
    conv = convert_state_dict(obj, config, teacher_preset=teacher_preset)
    tree: dict[str, Any] = {"autoencoder": _nest(_flat_arrays(conv["autoencoder"], nnx.Param))}
    if conv["linear_proj"] is not None:
        tree["linear_proj"] = {"kernel": conv["linear_proj"]}
    if conv["logvar"] is not None:
        tree["logvar"] = conv["logvar"]
    if conv["discriminator"] is not None:
        tree["discriminator"] = _nest(_flat_arrays(conv["discriminator"]))
    if conv["teacher"] is not None:
        tree["teacher"] = _nest(_flat_arrays(conv["teacher"], nnx.Param))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / STATE_DIR, tree)
    checkpointer.wait_until_finished()
    if conv["lpips"] is not None:
        lpips_lib.save_lpips(conv["lpips"], out_dir / LPIPS_FILE)

    def cfg_dict(cfg):
        return None if cfg is None else dataclasses.asdict(cfg)

    meta = {
        "format": EXPORT_FORMAT,
        "source": str(pt_path.resolve()),
        "autoencoder_config": cfg_dict(config),
        "teacher_dim": None if conv["linear_proj"] is None else conv["linear_proj"].shape[-1],
        "present": conv["present"],
        "absent": conv["absent"],
        "discriminator_config": cfg_dict(conv["discriminator_config"]),
        "teacher_config": cfg_dict(conv["teacher_config"]),
        "lpips": LPIPS_FILE if conv["lpips"] is not None else None,
    }
    (out_dir / EXPORT_JSON).write_text(json.dumps(meta, indent=2, default=_json_default))
    log.info(
        "converted %s -> %s (present: %s; absent: %s)",
        pt_path,
        out_dir,
        conv["present"],
        conv["absent"],
    )
    return out_dir


def _json_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def read_export_meta(out_dir: str | pathlib.Path) -> dict:
    out_dir = pathlib.Path(out_dir)
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(
            f"{out_dir} is not a VA-VAE export (no {EXPORT_JSON}); create one with "
            f"`python launch/convert.py vavae --pt=<official .pt> --out={out_dir}`"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT!r}")
    return meta


def _fill(module: nnx.Module, flat: Mapping[str, Any], what: str, variable_type=nnx.Variable):
    ours = flat_params(module, variable_type)
    missing = sorted(set(ours) - set(flat))
    unexpected = sorted(set(flat) - set(ours))
    if missing or unexpected:
        raise ConversionError(f"{what}: missing {missing}, unexpected {unexpected}")
    for k, var in ours.items():
        var.set_value(jnp.asarray(flat[k], var.dtype))
    return module


def load_export(out_dir: str | pathlib.Path, *, dtype: str | None = None) -> dict[str, Any]:
    """Reads a directory written by `convert_official`.

    Returns {"config": AutoencoderConfig, "autoencoder": AutoencoderKL, "linear_proj": kernel
    [1, 1, embed_dim, T] or None, "logvar": scalar or None, "discriminator": NLayerDiscriminator
    or None, "teacher": Dinov2Model or None, "lpips": LPIPS or None, "meta": the json}.
    `dtype` overrides the compute dtype of the autoencoder (parameters stay float32).
    """
    import orbax.checkpoint as ocp

    from vavae_jax import discriminator as disc_lib
    from vavae_jax import foundation
    from vavae_jax import lpips as lpips_lib

    out_dir = pathlib.Path(out_dir).resolve()
    meta = read_export_meta(out_dir)
    cfg = AutoencoderConfig(**meta["autoencoder_config"])
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    ae = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    target: dict[str, Any] = {
        "autoencoder": _nest(
            {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in flat_params(ae, nnx.Param).items()
            }
        )
    }
    if meta["teacher_dim"] is not None:
        shape = (1, 1, cfg.embed_dim, int(meta["teacher_dim"]))
        target["linear_proj"] = {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
    if "logvar" in meta["present"]:
        target["logvar"] = jax.ShapeDtypeStruct((), jnp.float32)
    disc = teacher = None
    if meta["discriminator_config"] is not None:
        dcfg = disc_lib.DiscriminatorConfig(**meta["discriminator_config"])
        disc = nnx.eval_shape(lambda: disc_lib.NLayerDiscriminator(dcfg, rngs=nnx.Rngs(0)))
        target["discriminator"] = _nest(
            {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params(disc).items()}
        )
    if meta["teacher_config"] is not None:
        tcfg = foundation.Dinov2Config(**meta["teacher_config"])
        teacher = nnx.eval_shape(lambda: foundation.Dinov2Model(tcfg, rngs=nnx.Rngs(0)))
        target["teacher"] = _nest(
            {
                k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                for k, v in flat_params(teacher, nnx.Param).items()
            }
        )
    restored = ocp.StandardCheckpointer().restore(out_dir / STATE_DIR, target)
    result: dict[str, Any] = {"config": cfg, "meta": meta}
    result["autoencoder"] = _fill(ae, _flatten(restored["autoencoder"]), "autoencoder", nnx.Param)
    result["linear_proj"] = (
        jnp.asarray(restored["linear_proj"]["kernel"]) if "linear_proj" in restored else None
    )
    result["logvar"] = jnp.asarray(restored["logvar"]) if "logvar" in restored else None
    result["discriminator"] = (
        None if disc is None else _fill(disc, _flatten(restored["discriminator"]), "discriminator")
    )
    result["teacher"] = (
        None
        if teacher is None
        else _fill(teacher, _flatten(restored["teacher"]), "teacher", nnx.Param)
    )
    result["lpips"] = (
        lpips_lib.load_lpips_converted(out_dir / meta["lpips"]) if meta["lpips"] else None
    )
    return result


def config_mismatch(saved: AutoencoderConfig, wanted: AutoencoderConfig) -> dict:
    """{field: (saved, wanted)} over the fields that change the parameters."""
    return {
        f: (getattr(saved, f), getattr(wanted, f))
        for f in AUTOENCODER_ARCH_FIELDS
        if getattr(saved, f) != getattr(wanted, f)
    }


def load_trainer_workdir(workdir: str | pathlib.Path, *, dtype=None, step: int | None = None):
    """(AutoencoderKL, reference dict) from a vavae trainer workdir: the architecture from its
    config.json, the weights of checkpoint `step` (default: the latest), the EMA weights when
    the run kept an EMA (config.ema.enabled), else the trained generator's. Only the
    autoencoder is read from the checkpoint (a partial restore)."""
    import ml_collections
    import orbax.checkpoint as ocp

    from vavae_jax import train as vae_train  # imported here: train imports this module
    from vavae_jax.runtime import checkpoint as ckpt_lib

    path = ckpt_lib.as_path(workdir)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{workdir} has checkpoints/ but no config.json: not a vavae trainer workdir "
            f"(launch/train.py --config=configs/vavae_f16d32.py writes both)"
        )
    config = ml_collections.ConfigDict(json.loads(config_file.read_text()))
    if config.get("trainer") != "vavae":
        raise ValueError(
            f"{workdir} is a {config.get('trainer')!r} run, not a VA-VAE one: pass the workdir "
            f"of launch/train.py --config=configs/vavae_f16d32.py"
        )
    if dtype is not None:
        config.dtype = dtype
    ae_cfg = vae_train.autoencoder_config(config)
    ae = nnx.eval_shape(lambda: AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0)))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        nnx.state(ae, nnx.Param),
    )
    group = "ema" if config.ema.enabled else "gen"
    target = {group: {"autoencoder": params}}
    ckpt = ckpt_lib.Checkpointer(path / "checkpoints", async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no VA-VAE checkpoint in {ckpt.directory}")
        restored = ckpt.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=target,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                    partial_restore=True,
                )
            ),
        )
    finally:
        ckpt.close()
    nnx.update(ae, restored["state"][group]["autoencoder"])
    log.info("tokenizer: %s weights of %s step %d", group, workdir, step)
    ref = dict(path=str(path), config=dataclasses.asdict(ae_cfg), step=int(step), weights=group)
    return ae, ref


def load_tokenizer(
    path: str | pathlib.Path,
    config: AutoencoderConfig | None = None,
    *,
    skip: tuple[str, ...] = ("discriminator", "lpips", "teacher"),
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """An `AutoencoderKL` from our export dir or an official `.pt` (then `config` is needed).

    Returns (model, groups) where groups is what `load_export` / `convert_state_dict` returns;
    from a `.pt` the groups in `skip` (the training-only modules) are recognised, not converted.
    With both an export and `config`, the architectures must match (ValueError naming fields).
    """
    path = pathlib.Path(path)
    if path.is_dir() and (path / "checkpoints").is_dir() and not (path / EXPORT_JSON).is_file():
        model, ref = load_trainer_workdir(path, dtype=None if config is None else config.dtype)
        if config is not None and (diff := config_mismatch(model.config, config)):
            raise ValueError(
                f"{path} trained an autoencoder with another architecture; differing fields "
                f"(run, requested): {diff}"
            )
        return model, {"autoencoder": model, "config": model.config, "trainer_run": ref}
    if path.is_dir():
        groups = load_export(path, dtype=None if config is None else config.dtype)
        if config is not None and (diff := config_mismatch(groups["config"], config)):
            raise ValueError(
                f"{path} holds an autoencoder with another architecture; differing fields "
                f"(export, requested): {diff}"
            )
        return groups["autoencoder"], groups
    if not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected an export directory written by "
            f"launch/convert.py vavae, or an official VA-VAE .pt)"
        )
    if config is None:
        raise ValueError(f"{path} is a PyTorch checkpoint: pass its AutoencoderConfig (a preset)")
    obj = load_torch_file(path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path} holds a {type(obj).__name__}, expected a dict")
    groups = convert_state_dict(obj, config, skip=skip)
    return groups["autoencoder"], groups


def _set_like(var: nnx.Variable, value) -> None:
    old = var.get_value()
    value = jnp.asarray(value, old.dtype)
    if tuple(value.shape) != tuple(old.shape):
        raise ValueError(f"shape {tuple(value.shape)} does not match {tuple(old.shape)}")
    if isinstance(old, jax.Array) and hasattr(old, "sharding"):
        value = jax.device_put(value, old.sharding)
    var.set_value(value)


def load_into_generator(gen: nnx.Module, path: str | pathlib.Path, ae_cfg: AutoencoderConfig):
    """Initialises a trainer `Generator` (autoencoder, linear_proj, logvar) from an official
    `.pt` or our export directory (`--config.init_from=`). The autoencoder architecture must
    equal `ae_cfg` (a ValueError names the differing fields); a checkpoint without the VF
    projection or logvar leaves those at their initial values (logged), never silently."""
    path = pathlib.Path(path)
    if path.is_dir():
        saved = AutoencoderConfig(**read_export_meta(path)["autoencoder_config"])
        if diff := config_mismatch(saved, ae_cfg):
            raise ValueError(
                f"init_from={path}: the export's autoencoder differs from the configured one; "
                f"(export, config): {diff}. Set --config.model.* to match, or use another export"
            )
    _, groups = load_tokenizer(path, ae_cfg)
    src = flat_params(groups["autoencoder"], nnx.Param)
    dst = flat_params(gen.autoencoder, nnx.Param)
    if set(src) != set(dst):
        raise ConversionError(
            f"init_from={path}: parameter names differ: only in checkpoint "
            f"{sorted(set(src) - set(dst))[:10]}, only in model {sorted(set(dst) - set(src))[:10]}"
        )
    for k, var in dst.items():
        _set_like(var, src[k].get_value())
    has_proj = hasattr(gen, "linear_proj")
    if has_proj and groups["linear_proj"] is not None:
        want = tuple(gen.linear_proj.kernel.get_value().shape)
        got = tuple(np.shape(groups["linear_proj"]))
        if want != got:
            raise ValueError(
                f"init_from={path}: linear_proj kernel {got} (teacher width {got[-1]}) does not "
                f"match the configured teacher's {want} (width {want[-1]}); use the teacher the "
                f"checkpoint was trained with"
            )
        _set_like(gen.linear_proj.kernel, groups["linear_proj"])
    elif has_proj:
        log.warning("init_from=%s has no linear_proj: the VF projection keeps its init", path)
    elif groups["linear_proj"] is not None:
        log.warning("init_from=%s: linear_proj not used (this run has no VF loss)", path)
    if groups["logvar"] is not None:
        _set_like(gen.logvar, groups["logvar"])
    else:
        log.warning("init_from=%s has no loss.logvar: logvar keeps its init", path)
    log.info("init_from=%s: loaded autoencoder%s", path, " + linear_proj" if has_proj else "")
