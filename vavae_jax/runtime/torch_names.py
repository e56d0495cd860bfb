"""Strict mapping of PyTorch state dicts (names and layouts) onto NNX modules.

Used by every `convert.py`. Torch itself is never imported here: state dicts arrive as
`Mapping[str, np.ndarray]` (see `load_torch_file` for the one place that reads `.pt` files).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import nnx


class ConversionError(ValueError):
    """A state dict does not match the target model; the message lists every problem."""


def flat_params(module: nnx.Module, variable_type=nnx.Variable) -> dict[str, nnx.Variable]:
    """`{"encoder.conv_in.kernel": Variable, ...}` for every variable of `module`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, variable_type)):
        out[".".join(str(p) for p in path)] = var
    return out


def torch_to_jax_array(name: str, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray:
    """Converts a tensor from PyTorch layout to ours, picking the rule by the target's rank."""
    value = np.asarray(value)
    if value.ndim == 4 and len(target_shape) == 4:  # Conv2d [O, I, kh, kw] -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and len(target_shape) == 2 and name.endswith("kernel"):
        return value.T  # Linear [out, in] -> [in, out]
    return value


def assign(
    module: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    name_map: Callable[[str], str | None],
    *,
    what: str,
    variable_type=nnx.Variable,
    allow_missing: tuple[str, ...] = (),
) -> None:
    """Copies `state_dict` into `module` in place, strictly.

    `name_map(torch_name)` returns our dotted path for a torch key, or None for a key that has no
    counterpart (it is then reported as unexpected). Every problem is collected and raised at once.
    """
    ours = flat_params(module, variable_type)
    unexpected, mismatched, seen = [], [], set()
    for key, value in state_dict.items():
        path = name_map(key)
        if path is None or path not in ours:
            unexpected.append(key)
            continue
        target = ours[path]
        arr = torch_to_jax_array(path, value, target.shape)
        if tuple(arr.shape) != tuple(target.shape):
            mismatched.append(
                f"{key} {tuple(np.shape(value))} -> {path} expects {tuple(target.shape)}"
            )
            continue
        seen.add(path)
        target.set_value(np.asarray(arr, dtype=target.dtype))
    missing = sorted(p for p in ours if p not in seen and not p.startswith(allow_missing))
    raise_on_mismatch(
        what,
        unexpected=unexpected,
        missing=[f"{p} (ours, no torch key)" for p in missing],
        mismatched=mismatched,
        hint="Is this a checkpoint of this model, with the same configuration?",
    )


def raise_on_mismatch(
    what: str,
    *,
    unexpected: Sequence[str] = (),
    missing: Sequence[str] = (),
    mismatched: Sequence[str] = (),
    hint: str,
    mismatch_label: str = "shape mismatches",
) -> None:
    """Raises one `ConversionError` listing every problem of a conversion (nothing if none)."""
    if not (unexpected or missing or mismatched):
        return
    lines = [f"state dict does not match {what}:"]
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {sorted(missing)}")
    if mismatched:
        lines.append(f"  {mismatch_label} ({len(mismatched)}): {list(mismatched)}")
    lines.append(f"  {hint}")
    raise ConversionError("\n".join(lines))


def load_torch_file(path: str | pathlib.Path) -> dict:
    """Reads a PyTorch `.pt`/`.pth`/`.ckpt` into nested dicts of numpy arrays (torch only here)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        import torch
    except ImportError as e:  # torch is an optional extra: conversion only
        raise ImportError(
            "reading PyTorch checkpoints needs torch: pip install -e '.[torch]'"
        ) from e
    obj = torch.load(path, map_location="cpu", weights_only=True)

    def to_numpy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().float().numpy() if x.is_floating_point() else x.detach().numpy()
        if isinstance(x, Mapping):
            return {k: to_numpy(v) for k, v in x.items()}
        return x

    return to_numpy(obj)
