"""LPIPS (VGG16 variant) in Flax NNX, NHWC, frozen; loaders for the torchvision and lpips weights.

Ported from taming's `taming/modules/losses/lpips.py` (what the reference's
`LPIPSWithDiscriminator` uses; `models/lpips.py` in the reference is the same code), which equals
the `lpips` package's `LPIPS(net="vgg", version="0.1", lpips=True, spatial=False)`:

  x, y in [-1, 1] -> (. - shift) / scale -> VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3,
  relu5_3 -> unit-normalise over channels (eps 1e-10 added to the norm) -> squared difference
  -> 1x1 conv to one channel (no bias) -> spatial mean -> sum over the five layers: [B, 1, 1, 1].

Weights: the VGG16 trunk from torchvision's ImageNet file (`vgg16-397923af.pth`, keys
`features.N.weight`) and the linear heads from the lpips package's `weights/v0.1/vgg.pth` (keys
`lin0.model.1.weight`, ...; byte-identical to taming's download, md5 d507d734...). They are read
with torch once (`convert_lpips`) into our `.npz`; training loads that with numpy only.

The weights are `Frozen` variables, not `nnx.Param`: an optimizer over `nnx.Param` never sees
them (no weight decay either), and the forward pass stops their gradient.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vavae_jax.runtime.torch_names import ConversionError, assign, flat_params, load_torch_file

log = logging.getLogger(__name__)

# (our name, torchvision `features` index, in channels, out channels) of VGG16's 13 convs.
VGG16_CONVS = (
    ("conv1_1", 0, 3, 64),
    ("conv1_2", 2, 64, 64),
    ("conv2_1", 5, 64, 128),
    ("conv2_2", 7, 128, 128),
    ("conv3_1", 10, 128, 256),
    ("conv3_2", 12, 256, 256),
    ("conv3_3", 14, 256, 256),
    ("conv4_1", 17, 256, 512),
    ("conv4_2", 19, 512, 512),
    ("conv4_3", 21, 512, 512),
    ("conv5_1", 24, 512, 512),
    ("conv5_2", 26, 512, 512),
    ("conv5_3", 28, 512, 512),
)
# LPIPS reads the ReLU outputs after these convs; a 2x2 max-pool precedes each stage after the first.
TAPS = ("conv1_2", "conv2_2", "conv3_3", "conv4_3", "conv5_3")
POOL_BEFORE = ("conv2_1", "conv3_1", "conv4_1", "conv5_1")
CHANNELS = (64, 128, 256, 512, 512)
# ScalingLayer: maps [-1, 1] images to ImageNet-normalised ones (lpips v0.1, taming).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
DROPOUT_RATE = 0.5  # NetLinLayer's nn.Dropout() (active only in torch's training mode)
MIN_SIZE = 16  # four 2x2 pools: relu5_3 is at 1/16 of the input size

FORMAT = "vavae_jax.lpips.vgg16/v1"  # marker stored in converted files
_FORMAT_KEY = "__format__"


class Frozen(nnx.Variable):
    """A weight of a frozen network (LPIPS): not an `nnx.Param`, never optimised."""


class FrozenConv(nnx.Module):
    """VGG's 3x3 conv (stride 1, padding 1, bias); HWIO kernel in `Frozen` variables, whose
    gradients are stopped."""

    def __init__(self, cin: int, cout: int, key: jax.Array, dtype):
        self.dtype = dtype
        # torchvision's VGG init (kaiming normal, fan_out, relu); replaced when weights are loaded.
        std = np.sqrt(2.0 / (cout * 9))
        self.kernel = Frozen(std * jax.random.normal(key, (3, 3, cin, cout), jnp.float32))
        self.bias = Frozen(jnp.zeros((cout,), jnp.float32))

    def __call__(self, x):
        w = jax.lax.stop_gradient(self.kernel[...]).astype(self.dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            w,
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + jax.lax.stop_gradient(self.bias[...]).astype(self.dtype)


def _max_pool_2x2(x):  # torch MaxPool2d(2, 2): floor on odd sizes
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class VGG16Features(nnx.Module):
    """torchvision `vgg16().features[:30]` (up to relu5_3), returning the five LPIPS taps."""

    def __init__(self, dtype, rngs: nnx.Rngs):
        for name, _, cin, cout in VGG16_CONVS:
            setattr(self, name, FrozenConv(cin, cout, rngs.params(), dtype))

    def __call__(self, x) -> list[jax.Array]:  # [B, H, W, 3]
        taps = []
        h = x
        for name, *_ in VGG16_CONVS:
            if name in POOL_BEFORE:
                h = _max_pool_2x2(h)
            h = jax.nn.relu(getattr(self, name)(h))
            if name in TAPS:
                taps.append(h)
        return taps  # [B, H, W, 64], [B, H/2, W/2, 128], ..., [B, H/16, W/16, 512]


def _normalize_channels(x):
    """lpips normalize_tensor: x / (||x||_C + 1e-10). The double `where` keeps the gradient
    finite where a feature vector is exactly zero (torch's sqrt backward gives NaN there)."""
    s = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    safe = jnp.where(s > 0, s, 1.0)
    norm = jnp.where(s > 0, jnp.sqrt(safe), 0.0)
    return x / (norm + NORMALIZE_EPS)


class NetLinLayer(nnx.Module):
    """The 1x1 head without bias, C -> 1 (lpips NetLinLayer), applied in float32."""

    def __init__(self, channels: int, key: jax.Array):
        # Random heads (smoke runs only) are non-negative, as the trained ones, so that the
        # result is a distance; loading replaces them.
        self.kernel = Frozen(
            jax.random.uniform(key, (1, 1, channels, 1), jnp.float32, 0, 2 / channels)
        )

    def __call__(self, x):  # [B, h, w, C] -> [B, h, w, 1]
        w = jax.lax.stop_gradient(self.kernel[...])[0, 0]
        return jnp.einsum("bhwc,co->bhwo", x, w, precision=jax.lax.Precision.HIGHEST)


class LPIPS(nnx.Module):
    """Learned perceptual distance, VGG16 variant: `lpips(x, y) -> [B, 1, 1, 1]` (float32).

    x, y: images [B, H, W, 3] in [-1, 1], H and W >= 16. `dtype` is the compute dtype of the
    convolutions; normalisation, differences and the result are float32.
    """

    def __init__(self, dtype: str = "float32", *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(dtype)
        self.net = VGG16Features(self.dtype, rngs)
        for k, c in enumerate(CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c, rngs.params()))

    def __call__(self, x, y, *, dropout_rng: jax.Array | None = None) -> jax.Array:
        """LPIPS per sample, [B, 1, 1, 1].

        `dropout_rng` switches on the heads' dropout (p=0.5 on the squared differences), i.e.
        torch's training mode of NetLinLayer. Off by default, as `LPIPS().eval()` intends; the
        reference's training nevertheless runs with it from its image logger's first
        `pl_module.eval(); ...; pl_module.train()` (global step 2) onwards.
        """
        _check_pair(x, y)
        shift = jnp.asarray(SHIFT, jnp.float32)
        scale = jnp.asarray(SCALE, jnp.float32)
        b = x.shape[0]
        # One VGG pass for x and y, interleaved (x0, y0, x1, y1, ...) rather than concatenated:
        # on a batch-split mesh each device then holds the pairs of its own samples.
        both = jnp.stack([x, y], axis=1).reshape(2 * b, *x.shape[1:]).astype(jnp.float32)
        feats = self.net(((both - shift) / scale).astype(self.dtype))
        keys = None if dropout_rng is None else jax.random.split(dropout_rng, len(CHANNELS))
        val = jnp.zeros((b, 1, 1, 1), jnp.float32)
        for k, f in enumerate(feats):
            f = _normalize_channels(f.astype(jnp.float32))
            f = f.reshape(b, 2, *f.shape[1:])
            diff = jnp.square(f[:, 0] - f[:, 1])  # [B, h, w, C_k]
            if keys is not None:
                keep = jax.random.bernoulli(keys[k], 1.0 - DROPOUT_RATE, diff.shape)
                diff = jnp.where(keep, diff / (1.0 - DROPOUT_RATE), 0.0)
            val = val + jnp.mean(getattr(self, f"lin{k}")(diff), axis=(1, 2), keepdims=True)
        return val


def _check_pair(x, y) -> None:
    for name, a in (("x", x), ("y", y)):
        if not hasattr(a, "shape") or a.ndim != 4 or a.shape[-1] != 3:
            raise ValueError(
                f"LPIPS: {name} must be images [B, H, W, 3] (NHWC) in [-1, 1], got "
                f"{getattr(a, 'shape', type(a))}"
            )
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"LPIPS: {name} must be floating point in [-1, 1], got {a.dtype}")
    if x.shape != y.shape:
        raise ValueError(f"LPIPS: x {x.shape} and y {y.shape} must have the same shape")
    if x.shape[1] < MIN_SIZE or x.shape[2] < MIN_SIZE:
        raise ValueError(
            f"LPIPS: images must be at least {MIN_SIZE}x{MIN_SIZE} (VGG16 pools four times), got "
            f"{x.shape[1]}x{x.shape[2]}"
        )


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------
def _abstract_lpips(dtype: str) -> LPIPS:
    """An LPIPS whose weights are shapes only: loaders set every one (or report it missing)."""
    return nnx.eval_shape(lambda: LPIPS(dtype, rngs=nnx.Rngs(0)))


_VGG_NAMES = {
    f"features.{idx}.{p}": f"net.{name}.{'kernel' if p == 'weight' else 'bias'}"
    for name, idx, _, _ in VGG16_CONVS
    for p in ("weight", "bias")
}
_HEAD_NAMES = {f"lin{k}.model.1.weight": f"lin{k}.kernel" for k in range(len(CHANNELS))}


def lpips_from_torch_state_dicts(
    vgg_state_dict: Mapping[str, np.ndarray],
    heads_state_dict: Mapping[str, np.ndarray],
    *,
    dtype: str = "float32",
) -> LPIPS:
    """LPIPS from torchvision's VGG16 state dict and the lpips heads (torch names and layouts).

    The VGG16 classifier (`classifier.*`, unused by LPIPS) is skipped; any other unknown key,
    any missing weight and any shape mismatch raises one `ConversionError` listing all of them.
    """
    vgg = {k: v for k, v in vgg_state_dict.items() if not k.startswith("classifier.")}
    if len(vgg) != len(vgg_state_dict):
        log.info("LPIPS: skipping the VGG16 classifier (%d keys)", len(vgg_state_dict) - len(vgg))
    overlap = sorted(set(vgg) & set(heads_state_dict))
    if overlap:
        raise ValueError(f"LPIPS: keys {overlap} appear in both the VGG16 and the heads state dict")
    names = {**_VGG_NAMES, **_HEAD_NAMES}
    model = _abstract_lpips(dtype)
    assign(
        model,
        {**vgg, **heads_state_dict},
        names.get,
        what="LPIPS-VGG16 (torchvision vgg16 `features.N.*` + lpips heads `linK.model.1.weight`)",
        variable_type=Frozen,
    )
    return model


def default_heads_path() -> pathlib.Path:
    """The lpips package's `weights/v0.1/vgg.pth` (found without importing the package)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the LPIPS heads default to the lpips package's weights/v0.1/vgg.pth, but lpips is "
            "not installed: pip install lpips==0.1.4, or pass heads_path= (taming's vgg.pth)"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "vgg.pth"
    if not path.is_file():
        raise FileNotFoundError(f"lpips heads not found at {path}; pass heads_path=")
    return path


def load_lpips(
    vgg_path: str | pathlib.Path,
    heads_path: str | pathlib.Path | None = None,
    *,
    dtype: str = "float32",
) -> LPIPS:
    """LPIPS from PyTorch files: torchvision's `vgg16-397923af.pth` and the heads `vgg.pth`
    (default: the lpips package's). Needs torch (imported here only)."""
    vgg_sd = load_torch_file(vgg_path)
    heads_sd = load_torch_file(heads_path if heads_path is not None else default_heads_path())
    for what, sd, path in (("VGG16", vgg_sd, vgg_path), ("heads", heads_sd, heads_path)):
        if not isinstance(sd, Mapping) or not all(isinstance(v, np.ndarray) for v in sd.values()):
            raise ValueError(f"LPIPS: the {what} file {path} is not a flat state dict of tensors")
    return lpips_from_torch_state_dicts(vgg_sd, heads_sd, dtype=dtype)


def save_lpips(model: LPIPS, out_path: str | pathlib.Path) -> pathlib.Path:
    """Writes the weights in our format: an `.npz` of float32 arrays under our dotted names."""
    out_path = pathlib.Path(out_path)
    if out_path.suffix != ".npz":
        raise ValueError(f"LPIPS weights are written as .npz, got {out_path}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.asarray(v[...], np.float32) for k, v in flat_params(model, Frozen).items()}
    np.savez(out_path, **{_FORMAT_KEY: np.asarray(FORMAT)}, **arrays)
    return out_path


def convert_lpips(
    vgg_path: str | pathlib.Path,
    heads_path: str | pathlib.Path | None,
    out_path: str | pathlib.Path,
) -> pathlib.Path:
    """torchvision VGG16 `.pth` + lpips heads `.pth` -> our `.npz` (then training needs no torch)."""
    return save_lpips(load_lpips(vgg_path, heads_path), out_path)


def load_lpips_converted(path: str | pathlib.Path, *, dtype: str = "float32") -> LPIPS:
    """LPIPS from a file written by `convert_lpips` (numpy only). Strict about names and shapes."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"LPIPS weights not found: {path}. Convert them once with "
            f"vavae_jax.lpips.convert_lpips(vgg16-397923af.pth, None, {path.name})"
        )
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    fmt = arrays.pop(_FORMAT_KEY, None)
    if fmt is None or str(fmt) != FORMAT:
        raise ValueError(
            f"{path} is not an LPIPS file written by vavae_jax.lpips.convert_lpips (format "
            f"{None if fmt is None else str(fmt)!r}, expected {FORMAT!r})"
        )
    model = _abstract_lpips(dtype)
    ours = flat_params(model, Frozen)
    unexpected = sorted(set(arrays) - set(ours))
    missing = sorted(set(ours) - set(arrays))
    mismatched = [
        f"{k} {arrays[k].shape}, expected {tuple(ours[k].shape)}"
        for k in sorted(set(arrays) & set(ours))
        if tuple(arrays[k].shape) != tuple(ours[k].shape)
    ]
    if unexpected or missing or mismatched:
        raise ConversionError(
            f"{path} does not match LPIPS-VGG16: unexpected {unexpected}, missing {missing}, "
            f"shape mismatches {mismatched}. Re-create it with convert_lpips."
        )
    for k, var in ours.items():
        var.set_value(jnp.asarray(arrays[k], jnp.float32))
    return model


def build_lpips(path: str, *, allow_random: bool = False, dtype: str = "float32") -> LPIPS:
    """The trainer's entry point: a converted `.npz`, or "random" weights for smoke runs only."""
    if path in ("", "random"):
        if not allow_random:
            raise ValueError(
                f"lpips path {path!r}: pass --config.lpips.path=<lpips.npz> (convert it once: "
                f"python launch/convert.py lpips --vgg=vgg16-397923af.pth --out=lpips.npz), or "
                f"--config.lpips.allow_random=True for a smoke run with random weights"
            )
        log.warning("LPIPS has RANDOM weights: the perceptual loss is meaningless (smoke run)")
        return LPIPS(dtype, rngs=nnx.Rngs(0))
    if pathlib.Path(path).suffix in (".pth", ".pt"):
        raise ValueError(
            f"lpips path {path} is a PyTorch file; convert it once (python launch/convert.py "
            f"lpips --vgg=vgg16-397923af.pth [--heads=vgg.pth] --out=lpips.npz) and pass "
            f"--config.lpips.path=lpips.npz"
        )
    return load_lpips_converted(path, dtype=dtype)
