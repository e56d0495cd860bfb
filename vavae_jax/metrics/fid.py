"""Frechet Inception Distance and Inception Score, and the ADM `.npz` sample / reference formats.

FID = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})   (Heusel et al. 2017, eq. 6)

The reference evaluators (pytorch-fid `calculate_frechet_distance`, used by LightningDiT's
`tools/calculate_fid.py`; ADM `evaluations/evaluator.py`) take `scipy.linalg.sqrtm(S1 @ S2)` of a
non-symmetric product. With rank-deficient covariances (fewer samples than 2048, mode collapse,
dead features) that returns complex matrices, negative distances, NaN, or raises "Imaginary
component" (LightningDiT issue #97). We use the symmetric route instead, in float64:

    tr((S1 S2)^{1/2}) = sum_i sqrt(eig_i(S1^{1/2} S2 S1^{1/2})) = sum_i sv_i(S2^{1/2} S1^{1/2})

(`S1 S2 = A B` and `S1^{1/2} S2 S1^{1/2} = B A` with `A = S1^{1/2}`, `B = S1^{1/2} S2` share
their non-zero eigenvalues, so this also holds for singular S1). The PSD square roots come from
`eigh`; eigenvalues under the numerical-rank tolerance (rounding noise of zero, including tiny
negative ones) are dropped (`_psd_factor`). The eigenvalues of `S1^{1/2} S2 S1^{1/2}` are taken
as the squared singular values of `C = S2^{1/2} S1^{1/2}` (`C^T C` is that matrix): the SVD does
not square the condition number, so for (nearly) equal statistics the result is ~1e-12 instead
of the ~1e-4 an `eigvalsh` of the product gives at 2048 dimensions.

Inception Score (Salimans et al. 2016) follows the ADM evaluator: softmax of the *unbiased*
logits (pool @ W, no fc bias), the samples split in order into 10 consecutive parts (ADM uses
parts of 5000, i.e. 10 parts for FID-50k), `exp(E_x KL(p(y|x) || p(y)))` per part, mean over parts.
ADM reports the mean; we also return the standard deviation over parts (improved-gan,
torch-fidelity). torch-fidelity additionally shuffles the samples before splitting; we do not.

Features: pytorch-fid's network (see `inception.py`). ADM's reference statistics
(`VIRTUAL_imagenet256_labeled.npz`: `mu`, `sigma`) were computed by the TensorFlow graph that
pytorch-fid's weights were ported from; its resize (TF1 `ResizeBilinear` without half-pixel
centres) and input scaling (`(x - 128) / 128`) differ slightly from pytorch-fid's, so FID against
those stored statistics is close to, not bit-equal with, the ADM evaluator's number.
"""

from __future__ import annotations

import logging
import pathlib
import zipfile
from collections.abc import Iterator

import numpy as np

from vavae_jax.metrics.inception import FeatureExtractor, FIDInceptionV3

log = logging.getLogger(__name__)

Stats = tuple[np.ndarray, np.ndarray]  # (mu [D] float64, sigma [D, D] float64)


# --------------------------------------------------------------------------------------------
# Statistics and distances
# --------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray, name: str = "") -> Stats:
    """(mean, covariance) in float64 of features [N, D], as `np.mean` / `np.cov(rowvar=False)`.
    `name` (e.g. "the samples") names the set in the warning about too few of them."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {features.shape}")
    n, d = features.shape
    if n < 2:
        raise ValueError(f"statistics need at least 2 feature vectors, got {n}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or inf; check the images and the Inception weights")
    if n <= d:
        log.warning(
            "FID statistics of %s from %d samples of %d-d features: the covariance has rank < "
            "%d; the distance stays finite but is biased (use 50k samples for FID-50k)",
            name or "a set",
            n,
            d,
            d,
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> Stats:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(
            f"{name}: expected mu [D] and sigma [D, D], got mu {mu.shape} and sigma {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: mu or sigma contains NaN or inf")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise ValueError(
            f"{name}: sigma is not symmetric (max |sigma - sigma^T| = {asym:.3g}, max |sigma| = "
            f"{scale:.3g}); is it a covariance matrix?"
        )
    return mu, (sigma + sigma.T) / 2


def _psd_factor(sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(w), V) of the eigenpairs of a PSD matrix above its numerical rank: sigma ~ V w V^T.

    Eigenvalues below `n * eps * max(w)` (the `np.linalg.matrix_rank` tolerance) are rounding
    noise of zero; dropping them instead of taking their square roots (each ~1e-8 * scale)
    keeps singular covariances exact and shrinks the SVD below to the ranks.
    """
    w, v = np.linalg.eigh(sigma)
    top = max(float(w.max()), 0.0)
    if w.min() < -1e-4 * top - 1e-12:  # float32-stored covariances round to ~1e-6
        raise ValueError(
            f"{name}: sigma has eigenvalue {w.min():.3g} (largest {top:.3g}); a covariance matrix "
            f"is positive semi-definite"
        )
    keep = w > top * len(w) * np.finfo(np.float64).eps
    return np.sqrt(w[keep]), v[:, keep]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^{1/2}) for PSD sigma1, sigma2.

    With sigma_i = V_i D_i^2 V_i^T, the singular values of sigma2^½ sigma1^½ are those of
    D2 (V2^T V1) D1 (orthogonal factors dropped), an r2 x r1 matrix for ranks r1, r2.
    """
    d1, v1 = _psd_factor(sigma1, "sigma1")
    d2, v2 = _psd_factor(sigma2, "sigma2")
    if d1.size == 0 or d2.size == 0:
        return 0.0
    c = d2[:, None] * (v2.T @ v1) * d1[None, :]
    return float(np.linalg.svd(c, compute_uv=False).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, robust (see top).

    Equal to pytorch-fid's `calculate_frechet_distance` where that one is well-conditioned;
    finite and real for singular covariances. Values of about -1e-12 for identical statistics
    are rounding and are returned as computed.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, "statistics 1")
    mu2, sigma2 = _check_stats(mu2, sigma2, "statistics 2")
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}; both statistics must "
            f"come from the same Inception layer (2048-d pool features)"
        )
    diff = mu1 - mu2
    tr_covmean = trace_sqrt_product(sigma1, sigma2)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, num_splits: int = 10) -> tuple[float, float]:
    """(mean, std) over `num_splits` consecutive parts of exp(E KL(p(y|x) || p(y))), float64.

    `logits` [N, K]: the unbiased logits of `FIDInceptionV3` (ADM's convention, see top).
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, num_classes], got shape {logits.shape}")
    if num_splits < 1 or len(logits) < num_splits:
        raise ValueError(
            f"inception_score: {len(logits)} samples cannot be split into {num_splits} parts; "
            f"use num_splits between 1 and the number of samples"
        )
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")
    m = logits.max(axis=1, keepdims=True)
    log_p = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))  # log p(y|x)
    scores = []
    for part in np.array_split(log_p, num_splits):
        # log p(y) = log mean_x p(y|x), computed stably as a log-sum-exp over the part.
        top = part.max(axis=0)
        log_py = top + np.log(np.exp(part - top).mean(axis=0))
        kl = (np.exp(part) * (part - log_py)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# ADM `.npz` batches
# --------------------------------------------------------------------------------------------


def _npz_keys(path: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        return sorted(n[: -len(".npy")] for n in z.namelist() if n.endswith(".npy"))


def _open_npz(path) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive (np.savez / np.savez_compressed)")
    return path


def npz_image_info(path, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the image array `key` of an `.npz`, read from the header only."""
    path = _open_npz(path)
    keys = _npz_keys(path)
    if key not in keys:
        raise ValueError(
            f"{path} has no {key!r} array (keys: {keys}); ADM sample batches store the images as "
            f"uint8 [N, H, W, 3] under 'arr_0' (np.savez(path, images))"
        )
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f, path, key)
    _check_image_array(path, key, shape, dtype)
    return shape, dtype


def _read_npy_header(f, path, key):
    """(shape, fortran_order, dtype) of an open `.npy` stream, leaving it at the data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"{path}[{key!r}]: unsupported .npy format version {version}")


def _check_image_array(path, key, shape, dtype) -> None:
    if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype) != np.uint8:
        raise ValueError(
            f"{path}[{key!r}] must be uint8 [N, H, W, 3] images (ADM format), got {np.dtype(dtype)} "
            f"{tuple(shape)}"
        )


def iter_npz_images(path, batch_size: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """Streams uint8 [<=batch_size, H, W, 3] batches of an `.npz` without loading it whole.

    FID-50k at 256x256 is 9.8 GB of images; reading the member in chunks keeps memory small.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shape, dtype = npz_image_info(path, key)
    path = pathlib.Path(path)
    with zipfile.ZipFile(path) as z, z.open(f"{key}.npy") as f:
        _, fortran, _ = _read_npy_header(f, path, key)
        if fortran:  # rare; column-major data cannot be streamed by rows
            arr = np.load(path)[key]
            for start in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[start : start + batch_size])
            return
        per_image = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            buf = f.read(n * per_image)
            if len(buf) != n * per_image:
                raise ValueError(f"{path}[{key!r}] is truncated at image {start}")
            yield np.frombuffer(buf, np.uint8).reshape(n, *shape[1:])


def load_statistics(path) -> Stats:
    """(mu, sigma) stored in an `.npz` (ADM reference batches, pytorch-fid `--save-stats`)."""
    path = _open_npz(path)
    keys = _npz_keys(path)
    if "mu" not in keys or "sigma" not in keys:
        raise ValueError(f"{path} has no 'mu'/'sigma' statistics (keys: {keys})")
    with np.load(path) as f:
        return _check_stats(f["mu"], f["sigma"], str(path))


def save_statistics(path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Writes `mu`, `sigma` as the ADM evaluator and pytorch-fid read them."""
    mu, sigma = _check_stats(mu, sigma, "save_statistics")
    np.savez(path, mu=mu, sigma=sigma)


def compute_activations(
    path, inception: FIDInceptionV3 | FeatureExtractor, batch_size: int = 100, mesh=None
) -> tuple[np.ndarray, np.ndarray]:
    """(pool [N, 2048], logits [N, 1008]) of the `arr_0` images of an `.npz`."""
    extractor = (
        inception
        if isinstance(inception, FeatureExtractor)
        else FeatureExtractor(inception, batch_size=batch_size, mesh=mesh)
    )
    return extractor.run(iter_npz_images(path, extractor.batch_size))


def reference_statistics(
    path, inception: FIDInceptionV3 | FeatureExtractor | None = None, **kwargs
) -> Stats:
    """Statistics of a reference batch: its stored `mu`/`sigma` if present (as ADM's evaluator
    does), else computed from its `arr_0` images with `inception`."""
    path = _open_npz(path)
    keys = _npz_keys(path)
    if "mu" in keys and "sigma" in keys:
        return load_statistics(path)
    if "arr_0" not in keys:
        raise ValueError(
            f"{path} is not a reference batch: it has neither 'mu'/'sigma' nor 'arr_0' images "
            f"(keys: {keys})"
        )
    if inception is None:
        raise ValueError(f"{path} stores images only ('arr_0'); pass an Inception to compute them")
    pool, _ = compute_activations(path, inception, **kwargs)
    return feature_statistics(pool, f"the reference {path}")


def compute_fid_from_npz(
    sample_npz,
    ref_npz,
    inception: FIDInceptionV3 | FeatureExtractor,
    *,
    batch_size: int = 100,
    mesh=None,
    num_splits: int = 10,
) -> dict[str, float]:
    """FID of a sample batch (`arr_0` uint8 [N, H, W, 3]) against a reference batch, and IS.

    Returns {"fid", "inception_score", "inception_score_std", "num_samples"}.
    """
    npz_image_info(sample_npz)  # fail on a bad sample file before the reference's features
    _open_npz(ref_npz)
    extractor = (
        inception
        if isinstance(inception, FeatureExtractor)
        else FeatureExtractor(inception, batch_size=batch_size, mesh=mesh)
    )
    ref_mu, ref_sigma = reference_statistics(ref_npz, extractor)
    pool, logits = compute_activations(sample_npz, extractor)
    mu, sigma = feature_statistics(pool, f"the samples {sample_npz}")
    is_mean, is_std = inception_score(logits, num_splits)
    return {
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        "inception_score": is_mean,
        "inception_score_std": is_std,
        "num_samples": len(pool),
    }
