"""Reconstruction metrics of the tokenizer: PSNR and SSIM, as the reference reports them.

Reference: LightningDiT `evaluate_tokenizer.py`.
- Images go to uint8 by `clamp(127.5 * x + 128, 0, 255).to(uint8)` (truncation: `to_uint8`);
  originals and reconstructions are saved as PNG and PSNR is computed per image pair on those
  uint8 values: `20 log10(255 / sqrt(mean((a - b)^2)))` over all H*W*3 values, float32, then
  averaged over images (`psnr` returns the per-image values).
- SSIM is torchmetrics' `StructuralSimilarityIndexMeasure(data_range=(-1.0, 1.0))` on the *float*
  images in [-1, 1] (the reconstruction is not quantised; both are clamped to the range):
  Gaussian window 11x11, sigma 1.5, k1 = 0.01, k2 = 0.03, data range 2, reflect padding by 5 and
  the mean over every pixel and channel (torchmetrics >= 1.5; up to 1.4 it cropped the 5-pixel
  border, which `padding="valid"` reproduces, as does skimage with `gaussian_weights=True,
  use_sample_covariance=False`). The reference averages the per-batch means (batches of 8);
  `ssim` returns the per-image values.
All functions are jittable and batched over NHWC images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def to_uint8(images):
    """[-1, 1] float -> uint8 [0, 255] exactly as the reference saves images (truncation)."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"to_uint8 expects float images in [-1, 1], got {images.dtype}")
    x = jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0.0, 255.0)
    return jnp.floor(x).astype(jnp.uint8)


def _check_pair(a, b, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 4:
        raise ValueError(f"{name}: expected NHWC batches [B, H, W, C], got shape {a.shape}")


@jax.jit
def psnr(a, b):
    """Per-image PSNR in dB of uint8 [B, H, W, C] images (reference `calculate_psnr`) -> [B].

    Identical images give +inf, as the reference does.
    """
    _check_pair(a, b, "psnr")
    for x in (a, b):
        if x.dtype != jnp.uint8:
            raise ValueError(
                f"psnr takes uint8 images as the reference computes it on saved PNGs, got "
                f"{x.dtype}; convert [-1, 1] floats with to_uint8"
            )
    d = a.astype(jnp.int32) - b.astype(jnp.int32)
    # Exact integer sums per row (< 2^31 up to ~11k pixels of width), then float32 over rows.
    rows = jnp.sum(d * d, axis=(2, 3)).astype(jnp.float32)  # [B, H]
    mse = jnp.sum(rows, axis=1) / np.float32(np.prod(a.shape[1:]))
    return 20.0 * jnp.log10(255.0 / jnp.sqrt(mse))


def _gaussian_1d(sigma: float) -> np.ndarray:
    """torchmetrics `_gaussian`: size int(3.5 sigma + 0.5) * 2 + 1, normalised to sum 1."""
    size = int(3.5 * sigma + 0.5) * 2 + 1
    dist = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = np.exp(-((dist / sigma) ** 2) / 2)
    return (g / g.sum()).astype(np.float32)


def _blur(x, kernel: np.ndarray):
    """Depthwise separable 'valid' Gaussian filter of [N, H, W, C]."""
    k = len(kernel)
    c = x.shape[-1]
    dn = ("NHWC", "HWIO", "NHWC")
    kh = jnp.broadcast_to(jnp.asarray(kernel).reshape(k, 1, 1, 1), (k, 1, 1, c))
    kw = jnp.broadcast_to(jnp.asarray(kernel).reshape(1, k, 1, 1), (1, k, 1, c))
    hi = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(
        x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi
    )
    return jax.lax.conv_general_dilated(
        x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c, precision=hi
    )


@functools.partial(jax.jit, static_argnames=("data_range", "sigma", "k1", "k2", "padding"))
def ssim(
    a,
    b,
    *,
    data_range: tuple[float, float] = (-1.0, 1.0),
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    padding: str = "reflect",
):
    """Per-image SSIM of float NHWC images -> [B] (torchmetrics' conventions, see the top).

    `a` is the prediction and `b` the target (SSIM is symmetric). Both are clamped to
    `data_range`; `padding="reflect"` is torchmetrics >= 1.5, `"valid"` crops the border.
    """
    _check_pair(a, b, "ssim")
    if padding not in ("reflect", "valid"):
        raise ValueError(f"ssim: padding must be 'reflect' or 'valid', got {padding!r}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"ssim: data_range must be (min, max) with max > min, got {data_range}")
    kernel = _gaussian_1d(sigma)
    pad = (len(kernel) - 1) // 2
    _, h, w, _ = a.shape
    need = pad + 1 if padding == "reflect" else len(kernel)
    if h < need or w < need:
        raise ValueError(
            f"ssim: images of {h}x{w} are too small for an {len(kernel)}x{len(kernel)} window "
            f"with padding={padding!r} (need at least {need}x{need})"
        )
    x = jnp.clip(a.astype(jnp.float32), lo, hi)
    y = jnp.clip(b.astype(jnp.float32), lo, hi)
    if padding == "reflect":
        widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
        x, y = jnp.pad(x, widths, mode="reflect"), jnp.pad(y, widths, mode="reflect")
    n = x.shape[0]
    moments = _blur(jnp.concatenate([x, y, x * x, y * y, x * y]), kernel)
    mu_x, mu_y, e_xx, e_yy, e_xy = (moments[i * n : (i + 1) * n] for i in range(5))
    c1, c2 = (k1 * (hi - lo)) ** 2, (k2 * (hi - lo)) ** 2
    var_x = jnp.maximum(e_xx - mu_x**2, 0.0)
    var_y = jnp.maximum(e_yy - mu_y**2, 0.0)
    cov = e_xy - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return s.mean(axis=(1, 2, 3))
