"""Official LightningDiT PyTorch checkpoints -> our NNX model and Orbax checkpoints.

The reference `train.py` saves `{"model": ..., "ema": ..., "opt": ..., "config": ...}`; released
files may also be a bare state dict, and DDP-wrapped ones carry `module.` prefixes. Names and
layouts are those of the reference `models/lightningdit.py`: `blocks.{i}.*` per block (stacked here
along a leading `depth` axis), `Linear.weight` [out, in], `Conv2d.weight` [out, in, kh, kw], the
fixed `pos_embed` [1, T, D] and, with RoPE, the buffers `feat_rope.freqs_cos` / `freqs_sin` (checked
against the table the config implies, not stored: we recompute them).

  from lightningdit_jax.convert import convert_file, load_converted
  convert_file("lightningdit-xl-imagenet256-800ep.pt", "/ckpt/xl1", PRESETS["XL/1"])
  model = load_converted("/ckpt/xl1", PRESETS["XL/1"])
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightningdit_jax.model import (
    Buffer,
    LightningDiT,
    LightningDiTConfig,
    abstract_model,
    rope_tables,
)
from vavae_jax.runtime.torch_names import ConversionError, load_torch_file, raise_on_mismatch

log = logging.getLogger(__name__)

STATE_DIR = "state"  # Orbax checkpoint of the pure state dict, under `out_dir`
CONFIG_FILE = "config.json"  # the LightningDiTConfig it was converted for
ROPE_KEYS = ("feat_rope.freqs_cos", "feat_rope.freqs_sin")
_NORMS = ("norm1", "norm2", "norm_final", "q_norm", "k_norm")
# Our attribute for an `nn.Sequential` member (the SiLUs have no weights).
_SEQUENTIAL = {"mlp_0": "mlp.0", "mlp_2": "mlp.2", "adaLN_modulation": "adaLN_modulation.1"}


def _torch_key(path: tuple[str, ...], block: int | None) -> str:
    """Our state path (("blocks", "attn", "qkv", "kernel")) -> the reference's key."""
    parts = [_SEQUENTIAL.get(p, p) for p in path]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    if block is not None:
        parts.insert(1, str(block))
    return ".".join(parts)


def _to_torch_layout(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:  # [in, out] -> [out, in]
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def expected_keys(config: LightningDiTConfig) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Every reference key this config has (RoPE buffers apart) -> (our path, block or None)."""
    return _expected_keys(_targets(abstract_model(config)), config.depth)


def _targets(abstract: LightningDiT) -> dict[tuple[str, ...], nnx.Variable]:
    state = nnx.state(abstract, nnx.Any(nnx.Param, Buffer))
    return {tuple(str(p) for p in path): var for path, var in nnx.to_flat_state(state)}


def _expected_keys(targets, depth: int) -> dict[str, tuple[tuple[str, ...], int | None]]:
    out = {}
    for path in targets:
        for i in range(depth) if path[0] == "blocks" else [None]:
            out[_torch_key(path, i)] = (path, i)
    return out


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Removes the `module.` prefix of DDP-wrapped models."""
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], config: LightningDiTConfig
) -> LightningDiT:
    """Builds a `LightningDiT` from reference names and layouts, strictly.

    Unknown keys, missing keys, shape mismatches and RoPE buffers that differ from the table of
    `config` raise one `ConversionError` (a `ValueError`) that lists all of them. The parameters
    are written into an abstract model, so no random initialisation is spent at full size.
    """
    state_dict = strip_prefix(state_dict)
    abstract = abstract_model(config)
    graphdef, state = nnx.split(abstract)
    targets = _targets(abstract)
    expected = _expected_keys(targets, config.depth)
    rope_expected = dict(zip(ROPE_KEYS, rope_tables(config.head_dim, config.grid_size)))
    if not config.use_rope:
        rope_expected = {}

    unexpected = sorted(k for k in state_dict if k not in expected and k not in rope_expected)
    missing = sorted(k for k in [*expected, *rope_expected] if k not in state_dict)
    mismatched, values = [], {}
    per_block: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for key, (path, block) in expected.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        want = targets[path].shape[1:] if block is not None else targets[path].shape
        torch_shape = _to_torch_layout(tuple(want), path[-1])
        if tuple(value.shape) != torch_shape:
            mismatched.append(f"{key} {tuple(value.shape)}, expected {torch_shape}")
            continue
        value = _from_torch_layout(value, path[-1]).astype(np.float32)
        if block is None:
            values[path] = value
        else:
            per_block.setdefault(path, {})[block] = value
    for key, table in rope_expected.items():
        if key not in state_dict:
            continue
        value = np.asarray(state_dict[key])
        if value.shape != table.shape:
            mismatched.append(f"{key} {tuple(value.shape)}, expected {table.shape}")
        elif not np.allclose(value, table, rtol=1e-5, atol=1e-5):
            mismatched.append(
                f"{key}: values differ from the RoPE table of this config (max abs diff "
                f"{np.abs(value - table).max():.3g}); is input_size/patch_size/heads right?"
            )
    raise_on_mismatch(
        f"LightningDiT({config})",
        unexpected=unexpected,
        missing=missing,
        mismatched=mismatched,
        mismatch_label="shape/value mismatches",
        hint="Is this a LightningDiT checkpoint of this configuration (preset, patch size, "
        "use_swiglu/use_rmsnorm/use_qknorm/wo_shift/use_rope, in_channels, num_classes)?",
    )
    for path, blocks in per_block.items():
        values[path] = np.stack([blocks[i] for i in range(config.depth)])

    for path, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(values[tuple(str(p) for p in path)], dtype=var.dtype))
    return nnx.merge(graphdef, state)


def load_torch_checkpoint(path: str | pathlib.Path, *, use_ema: bool = True) -> dict:
    """Reads an official `.pt` into a flat `{name: np.ndarray}` state dict (torch only here).

    Accepts `{"model": ..., "ema": ...}` (train.py checkpoints; `use_ema` picks the EMA weights,
    which the reference samples with) or a bare state dict; strips `module.` prefixes.
    """
    obj = load_torch_file(path)  # imports torch lazily; FileNotFoundError if absent
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected a dict (state dict or train.py checkpoint), got {type(obj).__name__}"
        )
    if "ema" in obj or "model" in obj:
        want = "ema" if use_ema else "model"
        if want not in obj:
            raise ValueError(
                f"{path} has no {want!r} entry (it has {sorted(obj)}); pass "
                f"use_ema={not use_ema} to convert the {'model' if use_ema else 'ema'} weights"
            )
        obj = obj[want]
    else:
        log.info("%s: a bare state dict (no model/ema entries); use_ema does not apply", path)
    bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {sorted(bad)[:10]}")
    return strip_prefix(obj)


def _config_json(config: LightningDiTConfig) -> dict:
    return dataclasses.asdict(config)


# Fields that change the parameters; dtype / remat / unroll / attention_impl may differ on load.
ARCHITECTURE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(LightningDiTConfig)
    if f.name not in ("dtype", "remat_policy", "scan_unroll", "attention_impl")
)


def convert_file(
    pt_path: str | pathlib.Path,
    out_dir: str | pathlib.Path,
    config: LightningDiTConfig,
    use_ema: bool = True,
) -> pathlib.Path:
    """Converts an official `.pt` into `out_dir/state` (Orbax) + `out_dir/config.json`."""
    import orbax.checkpoint as ocp

    out_dir = pathlib.Path(out_dir).resolve()
    state_path = out_dir / STATE_DIR
    if state_path.exists():
        raise FileExistsError(f"{state_path} exists; choose a new out_dir or delete it first")
    model = from_torch_state_dict(load_torch_checkpoint(pt_path, use_ema=use_ema), config)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(state_path, nnx.to_pure_dict(nnx.state(model)))
    checkpointer.wait_until_finished()
    (out_dir / CONFIG_FILE).write_text(json.dumps(_config_json(config), indent=2))
    log.info("converted %s (%s) -> %s", pt_path, "ema" if use_ema else "model", out_dir)
    return out_dir


def load_converted(out_dir: str | pathlib.Path, config: LightningDiTConfig) -> LightningDiT:
    """Restores a model written by `convert_file`; the architecture must match `config`."""
    import orbax.checkpoint as ocp

    out_dir = pathlib.Path(out_dir).resolve()
    state_path = out_dir / STATE_DIR
    if not state_path.is_dir():
        raise FileNotFoundError(f"no converted LightningDiT at {out_dir} (missing {STATE_DIR}/)")
    config_path = out_dir / CONFIG_FILE
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
        diff = {
            f: (saved.get(f), getattr(config, f))
            for f in ARCHITECTURE_FIELDS
            if _normalise(saved.get(f)) != _normalise(getattr(config, f))
        }
        if diff:
            raise ValueError(
                f"{out_dir} was converted for another architecture; (saved, requested): {diff}"
            )
    from vavae_jax.runtime.checkpoint import on_local_device

    graphdef, state = nnx.split(abstract_model(config))
    target = on_local_device(nnx.to_pure_dict(state))  # restorable where it was not converted
    restored = ocp.StandardCheckpointer().restore(state_path, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)


def _normalise(v):
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


__all__ = [
    "ConversionError",
    "convert_file",
    "expected_keys",
    "from_torch_state_dict",
    "load_converted",
    "load_torch_checkpoint",
]
