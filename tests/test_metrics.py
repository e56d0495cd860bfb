"""FID / IS / PSNR / SSIM: parity with pytorch-fid and torchmetrics, robustness, formats, errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import torch

from vavae_jax import interpolate, metrics
from vavae_jax.metrics import fid, inception
from vavae_jax.runtime.torch_names import flat_params

# --------------------------------------------------------------------------------------------
# A random-weight FID Inception in pytorch-fid and the same weights converted
# --------------------------------------------------------------------------------------------


def _random_fid_state_dict(images_nchw):
    """torchvision Inception3 (1008 classes, no aux head) with random weights whose BatchNorm
    statistics are calibrated on `images_nchw`, so activations stay O(1) through the network.

    The FID blocks of pytorch-fid only change `forward`, so their state dict has these keys.
    Variances get +1: channels of tiny variance would otherwise amplify float32 rounding ~30x
    per layer, which says nothing about either implementation.
    """
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=True
    )
    g = torch.Generator().manual_seed(1)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.5
            m.bias.data = torch.randn(m.bias.shape, generator=g) * 0.2
            m.momentum = None  # running stats = the statistics of the one calibration batch
    tv.fc.bias.data = torch.randn(1008, generator=g)
    tv.train()
    with torch.no_grad():
        x = torch.nn.functional.interpolate(
            images_nchw, size=(299, 299), mode="bilinear", align_corners=False
        )
        tv(2 * x - 1)
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var += 1.0
    return {k: v.detach().clone() for k, v in tv.state_dict().items()}


def _nchw(images_uint8):
    return torch.from_numpy(np.asarray(images_uint8)).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module")
def fid_nets():
    pfi = pytest.importorskip("pytorch_fid.inception")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    sd = _random_fid_state_dict(_nchw(images))
    # pytorch-fid's own FID network, with its weight download replaced by our random weights.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: sd)
        net = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    net.eval()
    sd_np = {k: v.numpy() for k, v in sd.items()}
    model = inception.from_torch_state_dict(sd_np)
    extractor = inception.FeatureExtractor(model, batch_size=2)

    def torch_features(imgs):
        with torch.no_grad():
            pool = net(_nchw(imgs))[0][:, :, 0, 0].double().numpy()
        return pool, pool @ sd_np["fc.weight"].T.astype(np.float64)

    return dict(
        images=images,
        sd=sd,
        sd_np=sd_np,
        model=model,
        extractor=extractor,
        torch_features=torch_features,
    )


def test_inception_parity_with_pytorch_fid(fid_nets):
    images = fid_nets["images"]
    pool, logits = fid_nets["extractor"](images)
    ref_pool, ref_logits = fid_nets["torch_features"](images)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool.dtype == np.float32
    assert np.abs(ref_pool).mean() > 0.1  # the random network is not degenerate
    np.testing.assert_allclose(pool, ref_pool, atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    # The unbiased logits (IS convention) differ from fc(pool) by exactly the bias.
    biased = np.asarray(fid_nets["model"].fc(jnp.asarray(pool)))
    np.testing.assert_allclose(
        biased - logits, np.broadcast_to(fid_nets["sd_np"]["fc.bias"], biased.shape), atol=1e-4
    )


@pytest.mark.parametrize("size", [(64, 64), (299, 299), (512, 300), (37, 450)])
def test_resize_matches_torch_bilinear(size):
    x = np.random.default_rng(1).random((2, *size, 3), dtype=np.float32)
    ours = interpolate.resize_bilinear(jnp.asarray(x), (299, 299))
    ref = (
        torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(0, 3, 1, 2),
            size=(299, 299),
            mode="bilinear",
            align_corners=False,
        )
        .permute(0, 2, 3, 1)
        .numpy()
    )
    np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-6, rtol=0)


def _assert_same_params(a, b):
    pa, pb = flat_params(a), flat_params(b)
    assert sorted(pa) == sorted(pb)
    for k in pa:
        np.testing.assert_array_equal(np.asarray(pa[k].get_value()), np.asarray(pb[k].get_value()))


def test_inception_npz_and_pth_round_trip(fid_nets, tmp_path):
    model = fid_nets["model"]
    path = inception.save_inception(model, tmp_path / "fid_inception.npz")
    _assert_same_params(model, metrics.load_inception(path))
    pth = tmp_path / "pt_inception.pth"
    torch.save(fid_nets["sd"], pth)
    _assert_same_params(model, metrics.load_inception(pth))


def test_inception_converter_is_strict(fid_nets):
    sd = dict(fid_nets["sd_np"])
    del sd["Mixed_6b.branch7x7_2.bn.running_var"]
    sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
    sd["fc.weight"] = np.zeros((1000, 2048), np.float32)
    with pytest.raises(ValueError) as err:
        inception.from_torch_state_dict(sd)
    msg = str(err.value)
    assert "AuxLogits.fc.weight" in msg
    assert "Mixed_6b.branch7x7_2.bn.var" in msg
    assert "fc.weight (1000, 2048)" in msg


def test_load_inception_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        metrics.load_inception(tmp_path / "missing.pth")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="save_inception"):
        metrics.load_inception(tmp_path / "other.npz")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown Inception weights format"):
        metrics.load_inception(tmp_path / "w.bin")


@pytest.mark.slow  # end to end (both archives through both Inceptions); fast tests check parity
def test_compute_fid_from_npz_end_to_end(fid_nets, tmp_path, monkeypatch):
    rng = np.random.default_rng(2)
    samples = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    refs = np.clip(samples.astype(int) + rng.integers(-40, 40, samples.shape), 0, 255)
    refs = refs.astype(np.uint8)
    np.savez(tmp_path / "samples.npz", samples)  # ADM format: arr_0
    np.savez_compressed(tmp_path / "ref_images.npz", arr_0=refs)
    # Streaming reader == np.load, for plain and compressed archives.
    for name, arr in (("samples.npz", samples), ("ref_images.npz", refs)):
        got = np.concatenate(list(metrics.iter_npz_images(tmp_path / name, 3)))
        np.testing.assert_array_equal(got, arr)

    ex = fid_nets["extractor"]
    seen = []

    def recording_frechet_distance(*stats):
        seen.append(stats)
        return real_frechet_distance(*stats)

    real_frechet_distance = fid.frechet_distance
    monkeypatch.setattr(fid, "frechet_distance", recording_frechet_distance)
    res = metrics.compute_fid_from_npz(
        tmp_path / "samples.npz", tmp_path / "ref_images.npz", ex, num_splits=2
    )
    assert res["num_samples"] == 4
    # 4 samples: rank-3 covariances of 2048-d features; the robust route stays finite.
    assert np.isfinite(res["fid"]) and res["fid"] > 0
    # The statistics it compared are those of pytorch-fid's features of the same images.
    ((mu, sigma, ref_mu, ref_sigma),) = seen
    t_pool, t_logits = fid_nets["torch_features"](samples)
    r_pool, _ = fid_nets["torch_features"](refs)
    for m, s, feats in ((mu, sigma, t_pool), (ref_mu, ref_sigma, r_pool)):
        t_mu, t_sigma = fid.feature_statistics(feats)
        np.testing.assert_allclose(m, t_mu, atol=1e-4)  # the feature parity tolerance
        # d cov(f, g) ~ std * d f + std * d g
        np.testing.assert_allclose(s, t_sigma, atol=2e-4 * np.sqrt(np.diag(t_sigma).max()))
    # Its value against a closed form from pytorch-fid's features: with S = A^T A (A: centred
    # features / sqrt(n - 1)), tr sqrt(S1 S2) is the nuclear norm of A2 A1^T (a 4x4 matrix).
    a1, a2 = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (t_pool, r_pool))
    closed = (
        np.sum((t_pool.mean(0) - r_pool.mean(0)) ** 2)
        + np.sum(a1**2)
        + np.sum(a2**2)
        - 2 * np.linalg.svd(a2 @ a1.T, compute_uv=False).sum()
    )
    np.testing.assert_allclose(res["fid"], closed, rtol=1e-4)
    np.testing.assert_allclose(
        res["inception_score"], metrics.inception_score(t_logits, 2)[0], rtol=1e-4
    )
    # A reference given as statistics (ADM's mu/sigma) is read instead of computed.
    metrics.save_statistics(tmp_path / "ref_stats.npz", ref_mu, ref_sigma)
    got_mu, got_sigma = metrics.reference_statistics(tmp_path / "ref_stats.npz")
    np.testing.assert_array_equal(got_mu, ref_mu)
    np.testing.assert_array_equal(got_sigma, ref_sigma)


def test_feature_extractor_sharded_over_mesh():
    # A small no-resize random network keeps this cheap; 8 fake CPU devices split the batch.
    model = inception.FIDInceptionV3(inception.InceptionConfig(resize_input=False), seed=0)
    images = np.random.default_rng(3).integers(0, 256, (5, 75, 75, 3), dtype=np.uint8)
    mesh = _mesh()
    assert mesh.size == 8
    sharded = inception.FeatureExtractor(model, batch_size=8, mesh=mesh)
    pool, logits = sharded(images)  # 5 images padded to one batch of 8
    assert pool.shape == (5, 2048) and logits.shape == (5, 1008)
    assert np.abs(pool).mean() > 0.1
    ref_pool, ref_logits = inception.FeatureExtractor(model, batch_size=8)(images)
    np.testing.assert_allclose(pool, ref_pool, atol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * np.abs(ref_logits).max())


def test_feature_extraction_bad_inputs(fid_nets, tmp_path):
    ex = fid_nets["extractor"]
    with pytest.raises(ValueError, match="uint8"):
        ex(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        ex(np.zeros((2, 64, 64, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        ex(np.zeros((64, 64, 3), np.uint8))
    np.savez(tmp_path / "noarr.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        list(metrics.iter_npz_images(tmp_path / "noarr.npz", 2))
    with pytest.raises(ValueError, match="neither 'mu'/'sigma' nor 'arr_0'"):
        metrics.reference_statistics(tmp_path / "noarr.npz", ex)
    np.savez(tmp_path / "float.npz", np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        list(metrics.iter_npz_images(tmp_path / "float.npz", 2))
    np.savez(tmp_path / "imgs.npz", np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="pass an Inception"):
        metrics.reference_statistics(tmp_path / "imgs.npz")
    with pytest.raises(FileNotFoundError):
        metrics.compute_fid_from_npz(tmp_path / "nope.npz", tmp_path / "imgs.npz", ex)
    with pytest.raises(ValueError, match="divisible"):
        inception.FeatureExtractor(fid_nets["model"], batch_size=3, mesh=_mesh())


def _mesh():
    from vavae_jax.runtime.sharding import make_mesh

    return make_mesh(data=-1)


# --------------------------------------------------------------------------------------------
# Frechet distance
# --------------------------------------------------------------------------------------------


def _naive_fid(mu1, s1, mu2, s2):
    """The pytorch-fid / ADM formula: sqrtm of the non-symmetric product (no eps retry)."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    d = mu1 - mu2
    return d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean), covmean


def test_frechet_distance_matches_scipy_full_rank():
    rng = np.random.default_rng(0)
    d = 64
    x = rng.normal(size=(500, d)) @ rng.normal(size=(d, d)) * 0.3
    y = rng.normal(size=(400, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.2
    s1, s2 = fid.feature_statistics(x), fid.feature_statistics(y)
    ref, covmean = _naive_fid(*s1, *s2)
    assert np.isfinite(covmean).all()
    ours = metrics.frechet_distance(*s1, *s2)
    np.testing.assert_allclose(ours, ref, rtol=1e-9)
    assert abs(metrics.frechet_distance(*s1, *s1)) < 1e-9 * np.trace(s1[1])


def test_frechet_distance_rank_deficient():
    rng = np.random.default_rng(1)
    d, n = 256, 30
    # Identical statistics from 30 samples of 256-d features (rank 29), at a large scale: the
    # naive sqrtm is complex with a large imaginary part (the reference raises), ours gives 0.
    x = np.abs(rng.normal(size=(n, d))) * 1e4
    mu, sigma = fid.feature_statistics(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            naive, covmean = _naive_fid(mu, sigma, mu, sigma)
            naive_ok = np.isfinite(naive) and abs(naive) < 1e-6 * np.trace(sigma)
        except ValueError:
            naive_ok = False
    assert not naive_ok, "expected the naive sqrtm to fail on this rank-deficient case"
    ours = metrics.frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(ours) and abs(ours) < 1e-9 * np.trace(sigma)

    # Commuting covariances with overlapping null spaces: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = np.zeros(d), np.zeros(d)
    a[: d // 2] = rng.uniform(1, 100, d // 2)
    b[d // 4 : 3 * d // 4] = rng.uniform(1, 100, d // 2)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    closed = np.sum((mu1 - mu2) ** 2) + a.sum() + b.sum() - 2 * np.sqrt(a * b).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    assert np.iscomplexobj(covmean) or not np.isfinite(covmean).all()  # the naive route's trouble
    np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), closed, rtol=1e-10)


def test_frechet_distance_bad_inputs():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(mu, sigma, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match=r"mu \[D\] and sigma \[D, D\]"):
        metrics.frechet_distance(mu, np.eye(3), mu, sigma)
    with pytest.raises(ValueError, match="not symmetric"):
        metrics.frechet_distance(mu, np.triu(np.ones((4, 4))), mu, sigma)
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.frechet_distance(mu, -np.eye(4), mu, sigma)
    with pytest.raises(ValueError, match="NaN"):
        metrics.frechet_distance(mu * np.nan, sigma, mu, sigma)
    with pytest.raises(ValueError, match="at least 2"):
        metrics.feature_statistics(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------------
# Inception Score
# --------------------------------------------------------------------------------------------


def test_inception_score_known_values():
    k = 10
    assert metrics.inception_score(np.zeros((20, k)), num_splits=2) == pytest.approx((1.0, 0.0))
    # Confident predictions spread evenly over the k classes in every split: IS = k.
    peaked = 60.0 * np.tile(np.eye(k), (4, 1))
    mean, std = metrics.inception_score(peaked, num_splits=4)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    # Random logits against the ADM evaluator's computation on softmax probabilities.
    logits = np.random.default_rng(0).normal(size=(100, 50)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 10):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = metrics.inception_score(logits)
    np.testing.assert_allclose([mean, std], [np.mean(scores), np.std(scores)], rtol=1e-10)
    with pytest.raises(ValueError, match="cannot be split"):
        metrics.inception_score(logits[:5], num_splits=10)
    with pytest.raises(ValueError, match=r"\[N, num_classes\]"):
        metrics.inception_score(logits[0])


# --------------------------------------------------------------------------------------------
# PSNR and SSIM
# --------------------------------------------------------------------------------------------


def _reference_psnr(a_uint8, b_uint8):
    """evaluate_tokenizer.py `calculate_psnr` on the loaded PNGs (float32 CHW tensors)."""
    out = []
    for a, b in zip(a_uint8, b_uint8):
        ta = torch.tensor(a.transpose(2, 0, 1), dtype=torch.float32)
        tb = torch.tensor(b.transpose(2, 0, 1), dtype=torch.float32)
        mse = torch.mean((ta - tb) ** 2)
        out.append(20 * torch.log10(255.0 / torch.sqrt(mse)).item())
    return np.array(out)


def test_to_uint8_and_psnr_match_reference():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.2, 1.2, (3, 32, 40, 3)).astype(np.float32)
    ref_u8 = torch.clamp(127.5 * torch.from_numpy(x) + 128.0, 0, 255).to(torch.uint8).numpy()
    np.testing.assert_array_equal(np.asarray(metrics.to_uint8(jnp.asarray(x))), ref_u8)
    a = rng.integers(0, 256, (3, 32, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    ours = np.asarray(metrics.psnr(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(ours, _reference_psnr(a, b), rtol=1e-6)
    assert np.isinf(np.asarray(metrics.psnr(jnp.asarray(a), jnp.asarray(a)))).all()
    with pytest.raises(ValueError, match="uint8"):
        metrics.psnr(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.psnr(jnp.asarray(a), jnp.asarray(b[:2]))
    with pytest.raises(ValueError, match="float images"):
        metrics.to_uint8(jnp.asarray(a))


def test_ssim_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.functional.image")
    rng = np.random.default_rng(0)
    # Smooth targets (SSIM's regime) and noisy predictions that also leave [-1, 1].
    base = rng.normal(size=(3, 12, 14, 3))
    target = np.tanh(np.asarray(jax.image.resize(base, (3, 36, 44, 3), "cubic")))
    preds = target + 0.15 * rng.normal(size=target.shape)
    target, preds = target.astype(np.float32), preds.astype(np.float32)
    tp, tt = (torch.from_numpy(v).permute(0, 3, 1, 2) for v in (preds, target))
    ref, full = tm.structural_similarity_index_measure(
        tp, tt, data_range=(-1.0, 1.0), reduction="none", return_full_image=True
    )
    ours = np.asarray(metrics.ssim(jnp.asarray(preds), jnp.asarray(target)))
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6)
    # The border-cropped variant (torchmetrics <= 1.4, skimage) is the same map without 5 pixels.
    valid = np.asarray(metrics.ssim(jnp.asarray(preds), jnp.asarray(target), padding="valid"))
    np.testing.assert_allclose(valid, full[..., 5:-5, 5:-5].mean((1, 2, 3)).numpy(), atol=2e-6)
    # The reference's module (its per-batch value is the mean over the batch).
    module = pytest.importorskip("torchmetrics.image").StructuralSimilarityIndexMeasure
    assert float(module(data_range=(-1.0, 1.0))(tp, tt)) == pytest.approx(ours.mean(), abs=2e-6)
    same = np.asarray(metrics.ssim(jnp.asarray(target), jnp.asarray(target)))
    np.testing.assert_allclose(same, 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="too small"):
        metrics.ssim(jnp.zeros((1, 5, 40, 3)), jnp.zeros((1, 5, 40, 3)))
    with pytest.raises(ValueError, match="NHWC"):
        metrics.ssim(jnp.zeros((40, 40, 3)), jnp.zeros((40, 40, 3)))
    with pytest.raises(ValueError, match="padding"):
        metrics.ssim(jnp.zeros((1, 40, 40, 3)), jnp.zeros((1, 40, 40, 3)), padding="same")
