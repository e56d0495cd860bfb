"""Our own tokenizer checkpoint formats, and `load_autoencoder`: one loader for every source.

A VA-VAE tokenizer comes as
- an export folder (`launch/convert.py vavae`, `convert_official`): `vavae_export.json` (the
  configs, which groups are present) + `state/` (Orbax) + `lpips.npz`;
- a trainer run folder (`launch/train.py --config=configs/vavae_f16d32.py`): `config.json` +
  `checkpoints/` (the EMA weights when the run kept an EMA, else the trained generator's);
- an official PyTorch `.pt` (its architecture is not in the file: pass an `AutoencoderConfig`).

    from vavae_jax.checkpoints import load_autoencoder
    ae, info = load_autoencoder("ckpt/vavae")    # info["ref"]: what a LightningDiT run records

The PyTorch name mapping itself is `vavae_jax.convert`; this module never imports the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vavae_jax import convert
from vavae_jax.model import AutoencoderConfig, AutoencoderKL
from vavae_jax.runtime.torch_names import ConversionError, flat_params, load_torch_file

log = logging.getLogger(__name__)

EXPORT_FORMAT = "vavae_jax.export/v1"
EXPORT_JSON = "vavae_export.json"
STATE_DIR = "state"  # Orbax checkpoint of the array pytree, under the export directory
LPIPS_FILE = "lpips.npz"
RUN_CHECKPOINTS = "checkpoints"  # a trainer run folder: config.json + checkpoints/
# Fields that change the parameters (dtype may differ between an export and its use).
AUTOENCODER_ARCH_FIELDS = tuple(
    f.name for f in dataclasses.fields(AutoencoderConfig) if f.name != "dtype"
)


# ---------------------------------------------------------------------------------------------
# Architectures as data
# ---------------------------------------------------------------------------------------------
def autoencoder_config(fields: Mapping[str, Any], *, dtype: str | None = None) -> AutoencoderConfig:
    """An `AutoencoderConfig` from a dict of its fields (json: lists for tuples); `dtype`
    overrides the stored compute dtype."""
    fields = dict(fields)
    unknown = sorted(set(fields) - set(AUTOENCODER_ARCH_FIELDS) - {"dtype"})
    if unknown:
        raise ValueError(
            f"tokenizer config {fields}: unknown fields {unknown}; expected those of "
            f"vavae_jax.model.AutoencoderConfig {AUTOENCODER_ARCH_FIELDS}"
        )
    if dtype is not None:
        fields["dtype"] = dtype
    return AutoencoderConfig(**fields)


def run_autoencoder_config(config, *, platform: str | None = None) -> AutoencoderConfig:
    """The autoencoder of a VA-VAE trainer config (its `model.*` fields carry the
    AutoencoderConfig names; `dtype` "auto" resolves for `platform`). Equal to
    `vavae_jax.train.autoencoder_config` (tests check), without importing the trainer."""
    from vavae_jax.runtime import trainer

    m = config.model
    return AutoencoderConfig(
        **{f: m[f] for f in AUTOENCODER_ARCH_FIELDS},
        dtype=jnp.dtype(trainer.compute_dtype(config, platform)).name,
    )


def config_mismatch(saved: AutoencoderConfig, wanted: AutoencoderConfig) -> dict:
    """{field: (saved, wanted)} over the fields that change the parameters."""
    return {
        f: (getattr(saved, f), getattr(wanted, f))
        for f in AUTOENCODER_ARCH_FIELDS
        if getattr(saved, f) != getattr(wanted, f)
    }


# ---------------------------------------------------------------------------------------------
# Export folders: the official checkpoint converted once (launch/convert.py vavae)
# ---------------------------------------------------------------------------------------------
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
    pt_path = pathlib.Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"VA-VAE checkpoint not found: {pt_path}")
    out_dir = pathlib.Path(out_dir).resolve()
    if (out_dir / STATE_DIR).exists() or (out_dir / EXPORT_JSON).exists():
        raise FileExistsError(f"{out_dir} already holds an export; choose a new --out or delete it")
    obj = load_torch_file(pt_path)
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{pt_path} holds a {type(obj).__name__}, expected a dict")
    conv = convert.convert_state_dict(obj, config, teacher_preset=teacher_preset)
    save_export(
        out_dir,
        conv["autoencoder"],
        linear_proj=conv["linear_proj"],
        logvar=conv["logvar"],
        discriminator=conv["discriminator"],
        discriminator_config=conv["discriminator_config"],
        teacher=conv["teacher"],
        teacher_config=conv["teacher_config"],
        lpips=conv["lpips"],
        source=str(pt_path.resolve()),
        present=conv["present"],
        absent=conv["absent"],
    )
    log.info(
        "converted %s -> %s (present: %s; absent: %s)",
        pt_path,
        out_dir,
        conv["present"],
        conv["absent"],
    )
    return out_dir


def save_export(
    out_dir: str | pathlib.Path,
    autoencoder: AutoencoderKL,
    *,
    source: str,
    linear_proj=None,
    logvar=None,
    discriminator: nnx.Module | None = None,
    discriminator_config=None,
    teacher: nnx.Module | None = None,
    teacher_config=None,
    lpips=None,
    present: list[str] | None = None,
    absent: list[str] | None = None,
) -> pathlib.Path:
    """Writes an export directory (read back with `load_export` / `load_autoencoder`).

    `out_dir/state/` Orbax checkpoint of {autoencoder, linear_proj?, logvar?, discriminator?,
    teacher?} (dotted names as nested dicts), `out_dir/lpips.npz` when `lpips` is given, and
    `out_dir/vavae_export.json` (configs, teacher width, which groups are present / absent,
    `source`). `convert_official` writes the official `.pt` this way; a training script can write
    its own weights the same way (launch/parity/vavae_ours.py --export_final).
    """
    import orbax.checkpoint as ocp

    from vavae_jax import lpips as lpips_lib

    out_dir = pathlib.Path(out_dir).resolve()
    if (out_dir / STATE_DIR).exists() or (out_dir / EXPORT_JSON).exists():
        raise FileExistsError(f"{out_dir} already holds an export; choose a new --out or delete it")
    groups = {
        "autoencoder": autoencoder,
        "linear_proj": linear_proj,
        "logvar": logvar,
        "discriminator": discriminator,
        "teacher": teacher,
    }
    if present is None:
        present = [k for k, v in groups.items() if v is not None] + (["lpips"] if lpips else [])
    if absent is None:
        absent = [k for k, v in groups.items() if v is None] + ([] if lpips else ["lpips"])
    tree: dict[str, Any] = {"autoencoder": _nest(_flat_arrays(autoencoder, nnx.Param))}
    if linear_proj is not None:
        tree["linear_proj"] = {"kernel": np.asarray(linear_proj, np.float32)}
    if logvar is not None:
        tree["logvar"] = np.asarray(logvar, np.float32)
    if discriminator is not None:
        tree["discriminator"] = _nest(_flat_arrays(discriminator))
    if teacher is not None:
        tree["teacher"] = _nest(_flat_arrays(teacher, nnx.Param))
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(out_dir / STATE_DIR, tree)
    checkpointer.wait_until_finished()
    if lpips is not None:
        lpips_lib.save_lpips(lpips, out_dir / LPIPS_FILE)

    def cfg_dict(cfg):
        return None if cfg is None else dataclasses.asdict(cfg)

    meta = {
        "format": EXPORT_FORMAT,
        "source": source,
        "autoencoder_config": cfg_dict(autoencoder.config),
        "teacher_dim": None if linear_proj is None else np.shape(linear_proj)[-1],
        "present": present,
        "absent": absent,
        "discriminator_config": cfg_dict(discriminator_config),
        "teacher_config": cfg_dict(teacher_config),
        "lpips": LPIPS_FILE if lpips is not None else None,
    }
    (out_dir / EXPORT_JSON).write_text(json.dumps(meta, indent=2, default=_json_default))
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


EXPORT_GROUPS = ("autoencoder", "linear_proj", "logvar", "discriminator", "teacher", "lpips")


def load_export(
    out_dir: str | pathlib.Path, *, dtype: str | None = None, groups=EXPORT_GROUPS
) -> dict[str, Any]:
    """Reads a directory written by `convert_official` / `save_export`.

    Returns {"config": AutoencoderConfig, "autoencoder": AutoencoderKL, "linear_proj": kernel
    [1, 1, embed_dim, T] or None, "logvar": scalar or None, "discriminator": NLayerDiscriminator
    or None, "teacher": Dinov2Model or None, "lpips": LPIPS or None, "meta": the json}.
    `dtype` overrides the compute dtype of the autoencoder (parameters stay float32). `groups`
    (a subset of EXPORT_GROUPS) restores only those, the others come back None: the DINOv2-L
    teacher an export may hold is 1.2 GB that a tokenizer or an init_from never reads.
    """
    import orbax.checkpoint as ocp

    from vavae_jax import discriminator as disc_lib
    from vavae_jax import foundation
    from vavae_jax import lpips as lpips_lib
    from vavae_jax.runtime.checkpoint import on_local_device

    if unknown := set(groups) - set(EXPORT_GROUPS):
        raise ValueError(f"load_export: unknown groups {sorted(unknown)}; known: {EXPORT_GROUPS}")
    out_dir = pathlib.Path(out_dir).resolve()
    meta = read_export_meta(out_dir)
    cfg = autoencoder_config(meta["autoencoder_config"], dtype=dtype)
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
    every = set(target)  # the groups the file holds
    target = {k: v for k, v in target.items() if k in groups}
    # On this process's device: exports hold numpy arrays (no saved sharding), but an export
    # written from device arrays names their platform, and would not restore on another.
    if set(target) == every:
        restored = ocp.StandardCheckpointer().restore(out_dir / STATE_DIR, on_local_device(target))
    else:  # the groups asked for; the others are not read
        restored = ocp.PyTreeCheckpointer().restore(
            out_dir / STATE_DIR, args=_partial_restore_args(target)
        )
    if "teacher" not in groups:
        teacher = None
    if "discriminator" not in groups:
        disc = None
    result: dict[str, Any] = {"config": cfg, "meta": meta}
    result["autoencoder"] = (
        _fill(ae, _flatten(restored["autoencoder"]), "autoencoder", nnx.Param)
        if "autoencoder" in restored
        else None
    )
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
        lpips_lib.load_lpips_converted(out_dir / meta["lpips"])
        if meta["lpips"] and "lpips" in groups
        else None
    )
    return result


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


# ---------------------------------------------------------------------------------------------
# Trainer run folders (launch/train.py --config=configs/vavae_f16d32.py)
# ---------------------------------------------------------------------------------------------
def _partial_restore_args(target):
    """Orbax arguments that restore the groups of `target` (shapes) on this process's device and
    read nothing else of the checkpoint."""
    import orbax.checkpoint as ocp

    from vavae_jax.runtime.checkpoint import on_local_device

    target = on_local_device(target)
    return ocp.args.PyTreeRestore(
        item=target,
        restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True,
    )


def _restore_part(ckpt, step: int, target) -> Any:
    """The groups of `target` (shapes) from the `state` item of a run's checkpoint `step`."""
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(state=_partial_restore_args(target))
    return ckpt.manager.restore(step, args=args)["state"]


def is_run_folder(path: str | pathlib.Path) -> bool:
    path = pathlib.Path(path)
    return (path / RUN_CHECKPOINTS).is_dir() and not (path / EXPORT_JSON).is_file()


def _read_run(
    workdir: str | pathlib.Path, *, dtype=None, step: int | None = None, extras: bool = False
) -> dict[str, Any]:
    """The autoencoder of a vavae trainer run folder: the architecture from its config.json, the
    weights of checkpoint `step` (default: the latest), the EMA weights when the run kept an EMA
    (config.ema.enabled), else the trained generator's. A partial restore: only the autoencoder,
    plus the VF projection and logvar with `extras` (those the run has)."""
    import ml_collections

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
    ae_cfg = run_autoencoder_config(config)
    group = "ema" if config.ema.enabled else "gen"
    ckpt = ckpt_lib.Checkpointer(path / RUN_CHECKPOINTS, async_save=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no VA-VAE checkpoint in {ckpt.directory}")
        teacher_dim, has_logvar = None, False
        if extras:  # what the run holds, from the checkpoint's metadata (no array read)
            stored = ckpt.state_metadata(step)
            proj = [v for k, v in stored.items() if k.startswith(f"{group}/linear_proj/")]
            teacher_dim = int(proj[0].shape[-1]) if proj else None
            has_logvar = any(k.startswith(f"{group}/logvar") for k in stored)

        def build():
            from vavae_jax.train_step import Generator

            if not extras:
                return AutoencoderKL(ae_cfg, rngs=nnx.Rngs(0))
            return Generator(ae_cfg, teacher_dim, 0.0, rngs=nnx.Rngs(0))

        module = nnx.eval_shape(build)
        params = nnx.state(module, nnx.Param)
        if not extras:
            params = {"autoencoder": params}
        elif not has_logvar:
            del params["logvar"]
        restored = {"state": _restore_part(ckpt, step, {group: params})}
    finally:
        ckpt.close()
    weights = restored["state"][group]
    ae = module.autoencoder if extras else module
    nnx.update(ae, weights["autoencoder"])
    log.info("tokenizer: %s weights of %s step %d", group, workdir, step)
    ref = dict(path=str(path), config=dataclasses.asdict(ae_cfg), step=int(step), weights=group)
    out = {"autoencoder": ae, "config": ae_cfg, "ref": ref, "linear_proj": None, "logvar": None}
    if extras and teacher_dim is not None:
        out["linear_proj"] = jnp.asarray(nnx.to_pure_dict(weights["linear_proj"])["kernel"])
    if extras and has_logvar:
        out["logvar"] = jnp.asarray(nnx.to_pure_dict(weights)["logvar"])
    return out


def load_trainer_workdir(workdir: str | pathlib.Path, *, dtype=None, step: int | None = None):
    """(AutoencoderKL, reference dict) of a vavae trainer run folder (see `load_autoencoder`)."""
    run = _read_run(workdir, dtype=dtype, step=step)
    return run["autoencoder"], run["ref"]


# ---------------------------------------------------------------------------------------------
# The front door
# ---------------------------------------------------------------------------------------------
def load_autoencoder(
    path: str | pathlib.Path,
    config: AutoencoderConfig | None = None,
    *,
    dtype: str | None = None,
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The VA-VAE `AutoencoderKL` of an export folder, a trainer run folder or an official `.pt`.

    Returns (model, info): info["ref"] is what a LightningDiT run records about its tokenizer
    (path, architecture as an AutoencoderConfig dict; step and weights of a run folder);
    info["config"] the AutoencoderConfig; the other entries are the groups the source holds
    (an export's "lpips", "linear_proj", "logvar", ...; see `load_export`). A folder carries its
    architecture; with `config` as well, the two must match (a ValueError names the differing
    fields). A `.pt` needs `config` (a preset of vavae_jax.model.PRESETS). `dtype` overrides the
    compute dtype (default: `config`'s, else the stored one); parameters stay float32.
    """
    if dtype is None and config is not None:
        dtype = config.dtype
    path = pathlib.Path(path)
    if path.is_dir() and is_run_folder(path):
        info = _read_run(path, dtype=dtype)
        info["trainer_run"] = info["ref"]
        what = "trained an autoencoder"
    elif path.is_dir():
        info = load_export(path, dtype=dtype)
        info["ref"] = dict(path=os.path.abspath(path), config=dataclasses.asdict(info["config"]))
        what = "holds an autoencoder"
    elif not path.exists():
        raise FileNotFoundError(
            f"tokenizer not found: {path} (expected an export folder written by "
            f"launch/convert.py vavae, a VA-VAE trainer run folder, or an official VA-VAE .pt)"
        )
    else:
        if config is None:
            raise ValueError(
                f"{path} is a PyTorch checkpoint: pass its AutoencoderConfig (a preset of "
                f"vavae_jax.model.PRESETS, e.g. PRESETS['f16d32'])"
            )
        if dtype is not None:
            config = dataclasses.replace(config, dtype=dtype)
        _, info = convert.load_official(path, config)
        info["config"] = config
        info["ref"] = dict(path=os.path.abspath(path), config=dataclasses.asdict(config))
        return info["autoencoder"], info
    if config is not None and (diff := config_mismatch(info["config"], config)):
        raise ValueError(
            f"{path} {what} with another architecture; differing fields (stored, requested): {diff}"
        )
    return info["autoencoder"], info


# ---------------------------------------------------------------------------------------------
# Training's init_from: the autoencoder and the generator's extras (VF projection, logvar)
# ---------------------------------------------------------------------------------------------
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
    `.pt`, our export folder or a VA-VAE trainer run folder (`--config.init_from=`). The
    autoencoder architecture must equal `ae_cfg` (a ValueError names the differing fields); a
    checkpoint without the VF projection or logvar leaves those at their initial values (logged),
    never silently. `load_init_from` loads the PatchGAN as well, reading the source once."""
    groups, _ = _read_init_source(path, ae_cfg, generator=True, disc=None)
    _set_generator(gen, groups, path)


def load_init_from(
    gen: nnx.Module, disc: nnx.Module, path: str | pathlib.Path, ae_cfg: AutoencoderConfig
) -> bool:
    """Training's `init_from`: the generator as `load_into_generator` and the PatchGAN as
    `load_into_discriminator` set them, from one reading of the source (an official `.pt` is
    read and converted once). Returns whether the source held a PatchGAN."""
    groups, src_disc = _read_init_source(path, ae_cfg, generator=True, disc=disc)
    _set_generator(gen, groups, path)
    return _set_discriminator(disc, src_disc, path)


def _read_init_source(path, ae_cfg: AutoencoderConfig, *, generator: bool, disc):
    """(generator groups or None, PatchGAN module or None) of an `init_from` source, read once:
    the generator's groups when `generator`, the PatchGAN when `disc` (the trainer's, for its
    structure) is given. The source's autoencoder must be `ae_cfg`'s architecture."""
    path = pathlib.Path(path)
    run = path.is_dir() and is_run_folder(path)
    groups = src_disc = None
    if run:
        if generator:
            groups = _read_run(path, dtype=ae_cfg.dtype, extras=True)
            _check_init_arch(path, "run", groups["config"], ae_cfg)
        if disc is not None:
            src_disc = _run_discriminator(path, disc)
    elif path.is_dir():  # an export: the groups asked for only (not the teacher it may hold)
        wanted = ("autoencoder", "linear_proj", "logvar") if generator else ()
        if generator:
            saved = autoencoder_config(read_export_meta(path)["autoencoder_config"])
            _check_init_arch(path, "export", saved, ae_cfg)
        if disc is not None:
            wanted += ("discriminator",)
        loaded = load_export(path, dtype=ae_cfg.dtype, groups=wanted)
        groups = loaded if generator else None
        src_disc = loaded["discriminator"] if disc is not None else None
    else:
        if not path.exists():
            raise FileNotFoundError(
                f"init_from={path} not found (expected an official VA-VAE .pt, an export folder "
                f"written by launch/convert.py vavae, or a VA-VAE trainer run folder)"
            )
        skip = ("lpips", "teacher") + (() if disc is not None else ("discriminator",))
        _, loaded = convert.load_official(path, ae_cfg, skip=skip)
        groups = loaded if generator else None
        src_disc = loaded["discriminator"] if disc is not None else None
    return groups, src_disc


def _check_init_arch(path, what: str, saved: AutoencoderConfig, ae_cfg: AutoencoderConfig):
    if diff := config_mismatch(saved, ae_cfg):
        raise ValueError(
            f"init_from={path}: the {what}'s autoencoder differs from the configured one; "
            f"({what}, config): {diff}. Set --config.model.* to match, or use another {what}"
        )


def _set_generator(gen: nnx.Module, groups: dict, path) -> None:
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


# ---------------------------------------------------------------------------------------------
# Training's init_from: the PatchGAN (the reference's init_from_ckpt loads it with the rest)
# ---------------------------------------------------------------------------------------------
_DISC_ARCH_FIELDS = ("input_nc", "ndf", "n_layers")


def _disc_arch(cfg) -> dict:
    return {f: getattr(cfg, f) for f in _DISC_ARCH_FIELDS}


def _run_discriminator(workdir: pathlib.Path, disc: nnx.Module) -> nnx.Module | None:
    """The PatchGAN (weights and BatchNorm statistics) of a trainer run folder's latest
    checkpoint, in a copy of `disc`'s structure; None when the checkpoint has none. A PatchGAN
    of another shape (the run's config.json) is a ValueError naming both."""
    import ml_collections

    from vavae_jax import discriminator as disc_lib
    from vavae_jax.runtime import checkpoint as ckpt_lib

    ckpt = ckpt_lib.Checkpointer(workdir / RUN_CHECKPOINTS, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no VA-VAE checkpoint in {ckpt.directory}")
        if not any(k.startswith("disc/") for k in ckpt.state_metadata(step)):
            return None
        config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
        saved = disc_lib.DiscriminatorConfig(
            input_nc=int(config.model.out_ch),
            ndf=int(config.loss.disc_ndf),
            n_layers=int(config.loss.disc_num_layers),
        )
        if _disc_arch(saved) != _disc_arch(disc.config):
            raise ValueError(
                f"init_from={workdir}: the run's PatchGAN {_disc_arch(saved)} differs from the "
                f"configured {_disc_arch(disc.config)}; set --config.loss.disc_ndf / "
                f"disc_num_layers to match"
            )
        module = nnx.eval_shape(lambda: disc_lib.NLayerDiscriminator(disc.config, rngs=nnx.Rngs(0)))
        target = {
            "disc": nnx.state(module, nnx.Param),
            "disc_stats": nnx.state(module, nnx.BatchStat),
        }
        restored = _restore_part(ckpt, step, target)
    finally:
        ckpt.close()
    nnx.update(module, restored["disc"], restored["disc_stats"])
    return module


def load_into_discriminator(
    disc: nnx.Module, path: str | pathlib.Path, ae_cfg: AutoencoderConfig
) -> bool:
    """Initialises the trainer's PatchGAN (weights and BatchNorm statistics) from the
    `init_from` source: an official `.pt` (`loss.discriminator.*`), our export folder or a
    VA-VAE trainer run folder, as the reference's `init_from_ckpt` (load_state_dict with
    strict=False) loads it together with the autoencoder. Returns False, logged, when the source
    holds no PatchGAN (the discriminator then keeps its initialisation); a PatchGAN of another
    shape is a ValueError naming both."""
    _, src = _read_init_source(path, ae_cfg, generator=False, disc=disc)
    return _set_discriminator(disc, src, path)


def _set_discriminator(disc: nnx.Module, src: nnx.Module | None, path) -> bool:
    if src is None:
        log.warning("init_from=%s has no PatchGAN: the discriminator keeps its init", path)
        return False
    if _disc_arch(src.config) != _disc_arch(disc.config):
        raise ValueError(
            f"init_from={path}: its PatchGAN {_disc_arch(src.config)} differs from the "
            f"configured {_disc_arch(disc.config)}; set --config.loss.disc_ndf / disc_num_layers "
            f"to match, or use another source"
        )
    for kind in (nnx.Param, nnx.BatchStat):
        got, want = flat_params(src, kind), flat_params(disc, kind)
        if set(got) != set(want):
            raise ConversionError(
                f"init_from={path}: PatchGAN names differ: only in the source "
                f"{sorted(set(got) - set(want))[:10]}, only in the model "
                f"{sorted(set(want) - set(got))[:10]}"
            )
        for k, var in want.items():
            _set_like(var, got[k].get_value())
    log.info("init_from=%s: loaded the PatchGAN (weights and BatchNorm statistics)", path)
    return True
