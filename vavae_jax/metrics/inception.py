"""The FID Inception network of pytorch-fid in Flax NNX (NHWC), its converter and feature extraction.

Ported from pytorch-fid `pytorch_fid/inception.py` (`InceptionV3(use_fid_inception=True)` built by
`fid_inception_v3()`), which is torchvision's `Inception3` with the blocks patched to reproduce the
TensorFlow graph of the 2015-12-05 Inception (the network behind the original FID):
  - `FIDInceptionA/C/E_1`: the pool branch is an average pool that ignores the zero padding
    (`count_include_pad=False`, TensorFlow's behaviour);
  - `FIDInceptionE_2` (Mixed_7c): the pool branch is a 3x3 *max* pool;
  - the classifier has 1008 classes (the TF graph's softmax width).
Input handling follows pytorch-fid's forward: images in [0, 1], bilinear resize to 299x299
(`F.interpolate(..., align_corners=False)`, no antialiasing), then `2x - 1`.

Outputs are the 2048-d pool features (FID) and the 1008-way logits *without* the fc bias, which is
how the ADM evaluator (`softmax/logits/MatMul` of the TF graph), improved-gan and torch-fidelity
(`logits_unbiased`) compute the Inception Score. `model.fc(pool)` gives the biased logits.

The weights come from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the user supplies the
file); `load_inception` converts it once and `save_inception` stores our `.npz`, so evaluation
never needs torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from vavae_jax.interpolate import resize_bilinear
from vavae_jax.runtime import sharding
from vavae_jax.runtime import sharding as _sharding
from vavae_jax.runtime.torch_names import assign, flat_params, load_torch_file

CONV_AXES = (None, None, "conv_in", "conv_out")
FORMAT = "vavae_jax.metrics.FIDInceptionV3/1"
POOL_DIM = 2048
NUM_CLASSES = 1008


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """pytorch-fid `InceptionV3(resize_input, normalize_input, use_fid_inception=True)`."""

    resize_input: bool = True  # bilinear resize to 299x299 as pytorch-fid
    normalize_input: bool = True  # [0, 1] -> [-1, 1]
    num_classes: int = NUM_CLASSES
    # FID compares statistics of 2048-d features; keep float32 and full-precision matmuls (no
    # TF32 / bf16 passes on accelerators) unless speed matters more than comparability.
    dtype: str = "float32"
    precision: str = "highest"


# --------------------------------------------------------------------------------------------
# Building blocks (torchvision `models/inception.py`, pytorch-fid `inception.py`)
# --------------------------------------------------------------------------------------------


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class _Init:
    """Initial values in numpy: zeros (weights about to be loaded) or He-normal (random tests).

    The network is a frozen, pretrained feature extractor, so there is no `nnx.Rngs`: drawing
    its ~100 differently shaped kernels with `jax.random` compiles one XLA program per shape
    (80 s on a CPU), and `nnx.eval_shape` of the Rngs-based build takes several seconds.
    """

    def __init__(self, seed: int | None):
        self.rng = None if seed is None else np.random.default_rng(seed)

    def kernel(self, shape: tuple[int, ...]) -> np.ndarray:
        if self.rng is None:
            return np.zeros(shape, np.float32)
        fan_in = int(np.prod(shape[:-1]))
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


class Conv2d(nnx.Module):
    """torch Conv2d without bias; kernel HWIO."""

    def __init__(self, cin, cout, kernel_size, *, stride, padding, init: _Init, config):
        kh, kw = _pair(kernel_size)
        self.kernel = _sharding.param(init.kernel((kh, kw, cin, cout)), CONV_AXES)
        ph, pw = _pair(padding)
        self.strides, self.padding = _pair(stride), ((ph, ph), (pw, pw))
        self.dtype, self.precision = config.dtype, config.precision

    def __call__(self, x):
        dtype = jnp.dtype(self.dtype)
        return jax.lax.conv_general_dilated(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            self.strides,
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=jax.lax.Precision(self.precision),
        )


class BatchNorm2d(nnx.Module):
    """torch BatchNorm2d in eval mode (running statistics), in float32."""

    def __init__(self, channels: int, eps: float):
        self.scale = _sharding.param(np.ones(channels, np.float32), ("conv_out",))
        self.bias = _sharding.param(np.zeros(channels, np.float32), ("conv_out",))
        self.mean = nnx.BatchStat(np.zeros(channels, np.float32))
        self.var = nnx.BatchStat(np.ones(channels, np.float32))
        self.eps = eps

    def __call__(self, x):
        inv = jax.lax.rsqrt(self.var[...] + self.eps) * self.scale[...]
        return (x.astype(jnp.float32) - self.mean[...]) * inv + self.bias[...]


class BasicConv2d(nnx.Module):
    """torchvision BasicConv2d: conv (no bias) -> BatchNorm(eps=1e-3, eval) -> ReLU."""

    def __init__(self, cin, cout, kernel_size, *, init: _Init, config, stride=1, padding=0):
        self.conv = Conv2d(
            cin, cout, kernel_size, stride=stride, padding=padding, init=init, config=config
        )
        self.bn = BatchNorm2d(cout, eps=1e-3)

    def __call__(self, x):  # [B, H, W, cin] -> [B, H', W', cout]
        y = self.conv(x)
        return jax.nn.relu(self.bn(y)).astype(y.dtype)


class Linear(nnx.Module):
    """torch Linear; kernel [in, out]."""

    def __init__(self, cin: int, cout: int, init: _Init):
        self.kernel = _sharding.param(init.kernel((cin, cout)), ("embed", "vocab"))
        self.bias = _sharding.param(np.zeros(cout, np.float32), ("vocab",))

    def __call__(self, x):
        hi = jax.lax.Precision.HIGHEST
        return jnp.matmul(x, self.kernel[...], precision=hi) + self.bias[...]


def max_pool(x, window: int, stride: int, padding: int = 0):
    """torch max_pool2d (floor mode); padding counts as -inf."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    init = jnp.array(-jnp.inf, x.dtype)
    return jax.lax.reduce_window(
        x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad
    )


def avg_pool_3x3_exclude_pad(x):
    """torch `avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)` (TF's average pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
    total = jax.lax.reduce_window(x, jnp.array(0, x.dtype), jax.lax.add, window, strides, pad)
    _, h, w, _ = x.shape
    counts = np.outer(_window_counts(h), _window_counts(w))[:, :, None]  # [H, W, 1]
    return total / jnp.asarray(counts, x.dtype)


def _window_counts(n: int) -> np.ndarray:
    """How many of the 3 taps of a padded 3-window fall inside a length-n axis."""
    counts = np.full(n, 3.0, np.float32)
    counts[0] -= 1
    counts[-1] -= 1
    return counts


class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 64 + 64 + 96 + pool_features channels."""

    def __init__(self, cin: int, pool_features: int, *, init, config):
        conv = functools.partial(BasicConv2d, init=init, config=config)
        self.branch1x1 = conv(cin, 64, 1)
        self.branch5x5_1 = conv(cin, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(cin, pool_features, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (unpatched torchvision block): 35x35x288 -> 17x17x768."""

    def __init__(self, cin: int, *, init, config):
        conv = functools.partial(BasicConv2d, init=init, config=config)
        self.branch3x3 = conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: factorised 7x7 convolutions, 768 channels."""

    def __init__(self, cin: int, channels_7x7: int, *, init, config):
        conv = functools.partial(BasicConv2d, init=init, config=config)
        c7 = channels_7x7
        self.branch1x1 = conv(cin, 192, 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, 192, 1)

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (unpatched torchvision block): 17x17x768 -> 8x8x1280."""

    def __init__(self, cin: int, *, init, config):
        conv = functools.partial(BasicConv2d, init=init, config=config)
        self.branch3x3_1 = conv(cin, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(cin, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3):
            b7 = layer(b7)
        b7 = self.branch7x7x3_4(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class _FIDInceptionE(nnx.Module):
    """Mixed_7b/7c: 320 + 768 + 768 + 192 = 2048 channels; the pool branch differs (below)."""

    def __init__(self, cin: int, *, init, config):
        conv = functools.partial(BasicConv2d, init=init, config=config)
        self.branch1x1 = conv(cin, 320, 1)
        self.branch3x3_1 = conv(cin, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, 192, 1)

    def pool(self, x):
        raise NotImplementedError

    def __call__(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        bp = self.branch_pool(self.pool(x))
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801  (reference class name)
    """Mixed_7b: average pool without the padded zeros."""

    def pool(self, x):
        return avg_pool_3x3_exclude_pad(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801  (reference class name)
    """Mixed_7c: max pool, as the TF graph (pytorch-fid: "likely an error" of that graph, kept)."""

    def pool(self, x):
        return max_pool(x, 3, 1, padding=1)


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------


class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID Inception: images in [0, 1] -> (pool features, unbiased logits).

    Attribute names are torchvision's, so the pytorch-fid state dict maps one to one.
    """

    def __init__(self, config: InceptionConfig = InceptionConfig(), *, seed: int | None = None):
        """Zero weights (to be loaded: `load_inception`), or He-normal random ones with `seed`."""
        self.config = config
        init = _Init(seed)
        conv = functools.partial(BasicConv2d, init=init, config=config)
        kw = dict(init=init, config=config)
        self.Conv2d_1a_3x3 = conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, 3)
        self.Conv2d_2b_3x3 = conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, 1)
        self.Conv2d_4a_3x3 = conv(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, 32, **kw)
        self.Mixed_5c = FIDInceptionA(256, 64, **kw)
        self.Mixed_5d = FIDInceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = FIDInceptionC(768, 128, **kw)
        self.Mixed_6c = FIDInceptionC(768, 160, **kw)
        self.Mixed_6d = FIDInceptionC(768, 160, **kw)
        self.Mixed_6e = FIDInceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = FIDInceptionE_1(1280, **kw)
        self.Mixed_7c = FIDInceptionE_2(2048, **kw)
        self.fc = Linear(POOL_DIM, config.num_classes, init)

    def __call__(self, x):
        """x: [B, H, W, 3] float in [0, 1] -> (pool [B, 2048] float32, logits [B, 1008] float32)."""
        cfg = self.config
        x = x.astype(jnp.float32)
        if cfg.resize_input:
            x = resize_bilinear(x, (299, 299))  # [B, 299, 299, 3]
        if cfg.normalize_input:
            x = 2 * x - 1
        x = x.astype(jnp.dtype(cfg.dtype))
        # Block 0 (pytorch-fid `blocks[0]`)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
        x = max_pool(x, 3, 2)  # [B, 73, 73, 64]
        # Block 1
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # [B, 71, 71, 192]
        x = max_pool(x, 3, 2)  # [B, 35, 35, 192]
        # Block 2
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)  # -> [B, 17, 17, 768]
        for block in (self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = block(x)
        # Block 3
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [B, 8, 8, 2048]
        pool = x.astype(jnp.float32).mean(axis=(1, 2))  # AdaptiveAvgPool2d(1) -> [B, 2048]
        logits = jnp.matmul(pool, self.fc.kernel[...], precision=jax.lax.Precision.HIGHEST)
        return pool, logits


def features_from_uint8(model: FIDInceptionV3, images):
    """uint8 [B, H, W, 3] -> (pool, logits), as pytorch-fid after `ToTensor()` (x / 255)."""
    check_images(images)
    return model(images.astype(jnp.float32) / 255.0)


def check_images(images) -> None:
    """Raises a ValueError unless `images` is a uint8 [B, H, W, 3] batch."""
    shape, dtype = tuple(images.shape), np.dtype(images.dtype)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(
            f"images must be NHWC RGB batches [B, H, W, 3], got shape {shape}; add a batch axis "
            f"or convert grayscale/RGBA images to RGB"
        )
    if dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 in [0, 255] (the ADM sample format), got {dtype}; convert "
            f"[-1, 1] floats with vavae_jax.metrics.to_uint8"
        )


# --------------------------------------------------------------------------------------------
# Batched, jitted feature extraction
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _features(graphdef, state, images):
    return features_from_uint8(nnx.merge(graphdef, state), images)


class FeatureExtractor:
    """Jitted uint8 -> (pool, logits) over fixed-size batches, sharded over a mesh if given.

    The last batch is padded to `batch_size` so that one compilation serves a whole run.
    With a mesh, the batch axis is split over (`data`, `fsdp`) and the weights are replicated.
    Single host: every process that calls it reads and embeds all the images it is given.
    """

    def __init__(self, model: FIDInceptionV3, batch_size: int = 100, mesh=None):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.graphdef, state = nnx.split(model)
        self.batch_size, self.mesh = batch_size, mesh
        self.in_sharding = None
        if mesh is not None:
            if batch_size % mesh.size:
                raise ValueError(
                    f"batch_size {batch_size} is not divisible by the {mesh.size} devices of the "
                    f"mesh; choose a multiple of {mesh.size}"
                )
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
            self.in_sharding = sharding.batch_sharding(mesh, 4)
        self.state = state

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] (any N) -> (pool [N, 2048], logits [N, 1008]) float32 numpy."""
        check_images(images)
        pools, logits = [], []
        for start in range(0, len(images), self.batch_size):
            p, lg = self._batch(np.asarray(images[start : start + self.batch_size]))
            pools.append(p)
            logits.append(lg)
        if not pools:
            return np.zeros((0, POOL_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
        return np.concatenate(pools), np.concatenate(logits)

    def _batch(self, batch: np.ndarray):
        n = len(batch)
        if n < self.batch_size:
            pad = np.zeros((self.batch_size - n, *batch.shape[1:]), np.uint8)
            batch = np.concatenate([batch, pad])
        x = jax.device_put(batch, self.in_sharding) if self.in_sharding is not None else batch
        pool, logits = _features(self.graphdef, self.state, x)
        return np.asarray(pool)[:n], np.asarray(logits)[:n]

    def run(self, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Features of a stream of uint8 batches (e.g. `fid.iter_npz_images`), concatenated."""
        pools, logits = [], []
        for batch in batches:
            p, lg = self(batch)
            pools.append(p)
            logits.append(lg)
        if not pools:
            raise ValueError("no images to compute Inception features of (empty input)")
        return np.concatenate(pools), np.concatenate(logits)


# --------------------------------------------------------------------------------------------
# Conversion and storage
# --------------------------------------------------------------------------------------------

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def _torch_name(key: str) -> str | None:
    """pytorch-fid / torchvision key -> our dotted path (None: no counterpart)."""
    parts = key.split(".")
    if parts[0] == "fc" and len(parts) == 2:
        return {"weight": "fc.kernel", "bias": "fc.bias"}.get(parts[1])
    if len(parts) < 3:
        return None
    module, leaf = parts[-2], parts[-1]
    if module == "conv" and leaf == "weight":
        return ".".join(parts[:-1] + ["kernel"])
    if module == "bn" and leaf in _BN_NAMES:
        return ".".join(parts[:-1] + [_BN_NAMES[leaf]])
    return None


def _to_device(model: FIDInceptionV3) -> FIDInceptionV3:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state))


def from_torch_state_dict(
    state_dict: Mapping[str, np.ndarray], config: InceptionConfig = InceptionConfig()
) -> FIDInceptionV3:
    """Builds `FIDInceptionV3` from pytorch-fid's state dict (torchvision names, NCHW layouts).

    Strict: unknown keys (e.g. `AuxLogits.*` of a torchvision checkpoint), missing weights and
    shape mismatches (e.g. a 1000-class fc) raise one `ValueError` listing all of them.
    BatchNorm `num_batches_tracked` counters are not weights and are ignored.
    """
    state_dict = {
        k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")
    }
    model = FIDInceptionV3(config)
    assign(
        model,
        state_dict,
        _torch_name,
        what="pytorch-fid FID Inception (pt_inception-2015-12-05)",
        variable_type=nnx.Variable,
    )
    return _to_device(model)


def save_inception(model: FIDInceptionV3, path: str | pathlib.Path) -> pathlib.Path:
    """Writes our converted weights as `.npz` (dotted names, our layouts), readable without torch."""
    path = pathlib.Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"save_inception writes .npz files, got {path}")
    arrays = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}
    meta = {"format": FORMAT, "config": dataclasses.asdict(model.config)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)
    return path


def _load_npz(path: pathlib.Path, config: InceptionConfig | None) -> FIDInceptionV3:
    with np.load(path, allow_pickle=False) as f:
        if "__meta__" not in f.files:
            raise ValueError(
                f"{path} is not an Inception file written by save_inception (no __meta__ entry); "
                f"its keys start with {sorted(f.files)[:5]}"
            )
        meta = json.loads(str(f["__meta__"]))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        arrays = {k: f[k] for k in f.files if k != "__meta__"}
    config = config or InceptionConfig(**meta["config"])
    model = FIDInceptionV3(config)
    ours = flat_params(model)
    problems = []
    if unexpected := sorted(set(arrays) - set(ours)):
        problems.append(f"  unexpected arrays ({len(unexpected)}): {unexpected}")
    if missing := sorted(set(ours) - set(arrays)):
        problems.append(f"  missing arrays ({len(missing)}): {missing}")
    mismatched = [
        f"{k} {arrays[k].shape} expects {tuple(ours[k].shape)}"
        for k in sorted(set(arrays) & set(ours))
        if arrays[k].shape != tuple(ours[k].shape)
    ]
    if mismatched:
        problems.append(f"  shape mismatches ({len(mismatched)}): {mismatched}")
    if problems:
        raise ValueError("\n".join([f"{path} does not match FIDInceptionV3({config}):", *problems]))
    for k, var in ours.items():
        var.set_value(np.asarray(arrays[k], np.float32))
    return _to_device(model)


RANDOM = "random"
RANDOM_LABEL = "RANDOM WEIGHTS: numbers are meaningless"


def random_inception(seed: int = 0, config: InceptionConfig = InceptionConfig()) -> FIDInceptionV3:
    """The FID network with He-normal random weights, on device: for offline smoke tests only.
    FID and IS computed with it run the real code path but measure nothing."""
    return _to_device(FIDInceptionV3(config, seed=seed))


def load_inception(
    path: str | pathlib.Path, config: InceptionConfig | None = None
) -> FIDInceptionV3:
    """Loads the FID Inception from our `.npz` or from pytorch-fid's `.pth` (needs torch).

    `pt_inception-2015-12-05-6726825d.pth` is pytorch-fid's release asset; convert it once:
    `save_inception(load_inception("pt_inception-....pth"), "fid_inception.npz")`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found: {path}. Download pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth, or pass a .npz written by save_inception"
        )
    if path.suffix == ".npz":
        return _load_npz(path, config)
    if path.suffix in (".pth", ".pt"):
        sd = load_torch_file(path)
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__})")
        return from_torch_state_dict(sd, config or InceptionConfig())
    raise ValueError(f"unknown Inception weights format {path.suffix!r} ({path}): use .pth or .npz")
