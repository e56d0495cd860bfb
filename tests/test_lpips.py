"""LPIPS (VGG16): equal to the `lpips` package (random VGG16 trunk saved as a torchvision file,
the package's real linear heads), through both loaders; gradients; frozen weights; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vavae_jax import lpips as lpips_lib
from vavae_jax.runtime.torch_names import ConversionError

torch = pytest.importorskip("torch")

# lpips 0.1.4 builds its trunk with torchvision's deprecated `pretrained=` argument.
# One xdist worker runs the module: its fixtures (the lpips package's model, the jitted JAX side)
# are module-scoped and would otherwise be built once on each worker (14 s each on 2 cores).
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*deprecated since 0.13:UserWarning"),
    pytest.mark.xdist_group("lpips"),
]


@pytest.fixture(scope="module", autouse=True)
def lpips_pkg():
    """The reference implementation, installed by `.[test]`; the module is skipped without it.
    Imported when the module runs, not when it is collected: with torchvision it costs 2.4 s,
    which every xdist worker would pay at its start."""
    return pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def reference(lpips_pkg, tmp_path_factory):
    """lpips.LPIPS(net="vgg") with a random VGG16 trunk (no download), its trunk written as a
    torchvision `vgg16` state dict file (`features.N.weight`, as vgg16-397923af.pth)."""
    torch.manual_seed(0)
    ref = lpips_pkg.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    features = {}
    for i in range(1, 6):
        for k, v in getattr(ref.net, f"slice{i}").state_dict().items():
            features[f"features.{k}"] = v.clone()
    assert len(features) == 26
    vgg_path = tmp_path_factory.mktemp("lpips") / "vgg16_random.pth"
    torch.save(features, vgg_path)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 64, 64, generator=g)).clamp(-1, 1)
    y.requires_grad_(True)
    out = ref(x, y)  # [2, 1, 1, 1]
    out.sum().backward()
    return dict(
        vgg_path=vgg_path,
        x=x.numpy().transpose(0, 2, 3, 1),
        y=y.detach().numpy().transpose(0, 2, 3, 1),
        out=out.detach().numpy(),
        grad_y=y.grad.numpy().transpose(0, 2, 3, 1),
    )


@pytest.fixture(scope="module")
def model(reference):
    return lpips_lib.load_lpips(reference["vgg_path"])  # heads: the lpips package's vgg.pth


@pytest.fixture(scope="module")
def results(reference, model):
    """Everything the JAX side computes, in one jitted call (one compilation on 2 cores)."""
    graphdef, state = nnx.split(model)
    x, y = jnp.asarray(reference["x"]), jnp.asarray(reference["y"])

    @jax.jit
    def run(state, y):
        def total(state, y):
            return jnp.sum(nnx.merge(graphdef, state)(x, y))

        m = nnx.merge(graphdef, state)
        grad_state, grad_y = jax.grad(total, argnums=(0, 1))(state, y)
        return dict(
            out=m(x, y),
            same=m(x, x),
            dropout=m(x, y, dropout_rng=jax.random.key(0)),
            dropout_again=m(x, y, dropout_rng=jax.random.key(0)),
            grad_y=grad_y,
            grad_state=grad_state,
        )

    return run(state, y)


def test_equal_to_lpips_package(reference, results):
    out = results["out"]
    assert out.shape == (2, 1, 1, 1) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference["out"], rtol=1e-5, atol=1e-7)
    assert float(results["same"].max()) < 1e-12  # not exactly 0: x and y share one conv batch


def test_gradient_equal_to_torch_autograd(reference, results):
    ref = reference["grad_y"]
    np.testing.assert_allclose(results["grad_y"], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_weights_are_frozen(model, results):
    assert not jax.tree.leaves(nnx.state(model, nnx.Param))  # invisible to nnx.Param optimizers
    assert jax.tree.leaves(nnx.state(model, lpips_lib.Frozen))
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(results["grad_state"]))


def test_dropout_option(reference, results):
    a = results["dropout"]
    assert np.all(np.isfinite(a)) and np.all(np.asarray(a) >= 0)
    np.testing.assert_array_equal(a, results["dropout_again"])
    assert not np.allclose(a, reference["out"], rtol=1e-3)


def test_converted_file_round_trip(reference, model, tmp_path):
    path = lpips_lib.convert_lpips(reference["vgg_path"], None, tmp_path / "lpips_vgg.npz")
    loaded = lpips_lib.load_lpips_converted(path)
    for (k, a), (k2, b) in zip(
        sorted(nnx.to_flat_state(nnx.state(model))), sorted(nnx.to_flat_state(nnx.state(loaded)))
    ):
        assert k == k2
        np.testing.assert_array_equal(a[...], b[...])
    assert lpips_lib.build_lpips(str(path)) is not None
    with np.load(path) as data:  # our names, HWIO kernels
        assert data["net.conv1_1.kernel"].shape == (3, 3, 3, 64)
        assert data["lin4.kernel"].shape == (1, 1, 512, 1)


def test_random_lpips_for_smoke_runs_and_its_guard():
    with pytest.raises(ValueError, match="allow_random"):
        lpips_lib.build_lpips("random")
    with pytest.raises(ValueError, match="allow_random"):
        lpips_lib.build_lpips("")
    m = nnx.eval_shape(lambda: lpips_lib.build_lpips("random", allow_random=True))
    assert isinstance(m, lpips_lib.LPIPS) and m.net.conv5_3.kernel.shape == (3, 3, 512, 512)
    head = lpips_lib.NetLinLayer(64, jax.random.key(0))  # random heads are non-negative
    assert np.all(np.asarray(head.kernel[...]) >= 0)


def test_channel_normalisation_gradient_is_finite_at_zero_features():
    f = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
    out = lpips_lib._normalize_channels(f)
    np.testing.assert_allclose(out[0, 0, 0], [0.6, 0.8, 0.0, 0.0], rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(jnp.square(lpips_lib._normalize_channels(v) - 0.1)))(f)
    assert np.all(np.isfinite(g))


def test_loader_errors(reference, tmp_path):
    feats = {k: v.numpy() for k, v in torch.load(reference["vgg_path"], weights_only=True).items()}
    heads = {  # the package saved its heads from CUDA tensors
        k: v.numpy()
        for k, v in torch.load(lpips_lib.default_heads_path(), map_location="cpu").items()
    }
    bad = dict(feats)
    del bad["features.28.bias"]
    bad["features.0.weight"] = bad["features.0.weight"][:32]
    bad["features.30.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError) as err:
        lpips_lib.lpips_from_torch_state_dicts(bad, heads)
    for needle in ("net.conv5_3.bias", "features.0.weight", "features.30.weight"):
        assert needle in str(err.value)
    with pytest.raises(ConversionError, match="lin2"):
        lpips_lib.lpips_from_torch_state_dicts(
            feats, {k: v for k, v in heads.items() if "lin2" not in k}
        )
    # torchvision's classifier is part of the real file and is skipped.
    lpips_lib.lpips_from_torch_state_dicts(
        {**feats, "classifier.6.bias": np.zeros((1000,), np.float32)}, heads
    )

    np.savez(tmp_path / "other.npz", w=np.zeros(3))
    with pytest.raises(ValueError, match="not an LPIPS file"):
        lpips_lib.load_lpips_converted(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="convert_lpips"):
        lpips_lib.load_lpips_converted(tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError):
        lpips_lib.load_lpips(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="PyTorch file"):
        lpips_lib.build_lpips(str(reference["vgg_path"]))


def test_bad_images(model):
    x = jnp.zeros((2, 32, 32, 3))
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        model(jnp.zeros((2, 3, 32, 32)), jnp.zeros((2, 3, 32, 32)))  # NCHW
    with pytest.raises(ValueError, match="same shape"):
        model(x, jnp.zeros((1, 32, 32, 3)))
    with pytest.raises(ValueError, match="at least 16x16"):
        model(jnp.zeros((2, 8, 8, 3)), jnp.zeros((2, 8, 8, 3)))
    with pytest.raises(ValueError, match="floating point"):
        model(jnp.zeros((2, 32, 32, 3), jnp.uint8), x)
