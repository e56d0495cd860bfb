"""Transport (paths, loss) and samplers (Euler / Heun / dopri5 ODE, Euler-Maruyama SDE, CFG)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import sampling
from lightningdit_jax.convert import from_torch_state_dict
from lightningdit_jax.sampling import cfg_model_output, sample_ode, sample_sde
from lightningdit_jax.transport import Transport, loss_at, training_loss
from tests.test_lightningdit_model import (
    FIXTURES,
    assert_rel_close,
    forward,
    load_reference,
    nhwc,
    normal,
)
from vavae_jax.runtime import sharding

cfg_output = nnx.jit(cfg_model_output, static_argnames=("cfg_channels", "guided"))


@pytest.fixture(scope="module", params=FIXTURES)
def reference(request, fixtures_dir):
    config, state, fx = load_reference(fixtures_dir, request.param)
    return from_torch_state_dict(state, config), fx


@pytest.fixture(scope="module")
def paper(fixtures_dir):
    config, state, fx = load_reference(fixtures_dir, "lightningdit_tiny_paper")
    return from_torch_state_dict(state, config), fx


# ---------------------------------------------------------------------------------------------
# Parity with the reference (forward_with_cfg and the Euler sampler)


@pytest.mark.parametrize("t", [0.05, 0.6])
def test_cfg_forward_matches_reference(reference, t):
    """cfg_out_*: the reference's doubled batch [cond | uncond] with guidance on channels 0..2."""
    model, fx = reference
    x, y = nhwc(fx["cfg_x"]), jnp.asarray(fx["cfg_y"])
    ref = nhwc(fx[f"cfg_out_t{t}"])
    half = x.shape[0] // 2
    tb = jnp.full((half,), t, jnp.float32)
    ours = cfg_output(model, x[:half], tb, y[:half], cfg_scale=4.0, cfg_interval_start=0.1)
    assert_rel_close(ours, ref[:half], 1e-5)
    # The reference's second half: the same guided channels, the unconditional rest.
    uncond = forward(model, x[:half], tb, y[half:])
    second = jnp.concatenate([ours[..., :3], uncond[..., 3:]], axis=-1)
    assert_rel_close(second, ref[half:], 1e-5)


def test_euler_sample_matches_reference(reference):
    model, fx = reference
    out = sample_ode(
        model,
        nhwc(fx["sample_z0"]),
        jnp.asarray(fx["sample_y"]),
        num_steps=9,
        method="euler",
        timestep_shift=0.3,
        cfg_scale=4.0,
        cfg_interval_start=0.1,
        cfg_channels="first3",
    )
    assert_rel_close(out, nhwc(fx["sample_out"]), 1e-4)


# ---------------------------------------------------------------------------------------------
# Guidance: the "all" formula, the interval, and the skip of the unconditional half


def test_cfg_all_channels_and_interval_against_formula(paper):
    model, fx = paper
    x, y = nhwc(fx["x"])[:2], jnp.asarray(fx["y"])[:2]
    null = jnp.full_like(y, model.config.num_classes)
    for t, guided in (([0.7, 0.3], True), ([0.3, 0.7], False)):  # t[0] decides for the batch
        t = jnp.asarray(t, jnp.float32)
        cond, uncond = forward(model, x, t, y), forward(model, x, t, null)
        want = uncond + 3.0 * (cond - uncond) if guided else cond
        got = cfg_output(model, x, t, y, cfg_scale=3.0, cfg_interval_start=0.5, cfg_channels="all")
        assert_rel_close(got, want, 1e-5)
        assert np.abs(np.asarray(want - cond)).max() > 1e-2 or not guided


def test_cfg_euler_sample_against_direct_loop(paper):
    model, fx = paper
    z0, y = nhwc(fx["sample_z0"]), jnp.asarray(fx["sample_y"])
    null = jnp.full_like(y, model.config.num_classes)
    n, shift, scale, start = 6, 0.3, 2.5, 0.3
    grid = np.linspace(0, 1, n, dtype=np.float32)
    grid = shift * grid / (1 + (shift - 1) * grid)
    x = z0
    for t, t_next in zip(grid[:-1], grid[1:]):
        tb = jnp.full((2,), t, jnp.float32)
        cond, uncond = forward(model, x, tb, y), forward(model, x, tb, null)
        v = uncond + scale * (cond - uncond) if t >= start else cond
        x = x + (t_next - t) * v
    out = sample_ode(
        model,
        z0,
        y,
        num_steps=n,
        timestep_shift=shift,
        cfg_scale=scale,
        cfg_interval_start=start,
        cfg_channels="all",
    )
    assert_rel_close(out, x, 1e-5)


def _counting(model, calls):
    """Wraps a model so that each call records (batch size, t[0]) when it runs."""

    class Counting(nnx.Module):
        def __init__(self, inner):
            self.inner = inner
            self.config = inner.config

        def __call__(self, x, t, y, **kwargs):
            batch = x.shape[0]
            jax.debug.callback(lambda t0: calls.append((batch, float(t0))), t[0])
            return self.inner(x, t, y, **kwargs)

    return Counting(model)


def test_unguided_steps_run_the_model_on_half_the_batch(paper):
    model, fx = paper
    z0, y = nhwc(fx["sample_z0"]), jnp.asarray(fx["sample_y"])
    calls = []
    sample_ode(_counting(model, calls), z0, y, num_steps=9, cfg_scale=4.0, cfg_interval_start=0.3)
    jax.effects_barrier()
    # 8 Euler steps at t = 0, 1/8, ..., 7/8: the first three are below the interval start.
    assert sorted(calls) == sorted(
        [(2, i / 8) for i in range(3)] + [(4, i / 8) for i in range(3, 8)]
    )
    calls.clear()
    sample_ode(_counting(model, calls), z0, y, num_steps=9, cfg_scale=1.0)
    jax.effects_barrier()
    assert sorted(calls) == [(2, i / 8) for i in range(8)]


# ---------------------------------------------------------------------------------------------
# Integrators


def test_heun_and_dopri5_converge_to_the_fine_euler_endpoint(paper):
    model, fx = paper
    z0, y = nhwc(fx["sample_z0"]), jnp.asarray(fx["sample_y"])
    kw = dict(timestep_shift=0.3)
    euler = {n: np.asarray(sample_ode(model, z0, y, num_steps=n, **kw)) for n in (33, 513, 1025)}
    fine = 2 * euler[1025] - euler[513]  # Richardson: removes Euler's first-order error
    err = {"euler33": np.abs(euler[33] - fine).max()}
    for n in (17, 33):
        heun = sample_ode(model, z0, y, num_steps=n, method="heun", **kw)
        err[f"heun{n}"] = np.abs(np.asarray(heun) - fine).max()
    dopri = sample_ode(model, z0, y, num_steps=2, method="dopri5", rtol=1e-5, atol=1e-6)
    err["dopri5"] = np.abs(np.asarray(dopri) - fine).max()
    assert err["euler33"] > 5e-3, err  # the coarse first-order run is visibly off
    assert err["heun33"] < 5e-4 and err["dopri5"] < 2e-4, err
    assert 3 < err["heun17"] / err["heun33"] < 5, err  # second order


# A Gaussian toy problem with known answers: data x1 ~ N(mu_y, s^2 I), Linear path. The exact
# velocity is v = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) (x - t mu), whose ODE flow maps
# z0 to mu + s z0 exactly; the score of p_t is -(x - t mu) / (t^2 s^2 + (1 - t)^2).


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    num_classes: int = 2
    class_dropout_prob: float = 0.1

    @property
    def null_label(self):
        return self.num_classes


MU = np.array([[1.0, -1.0, 0.5, 2.0], [-2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
S = 0.5


class GaussianVelocity(nnx.Module):
    def __init__(self):
        self.config = ToyConfig()
        self.mu = nnx.Param(jnp.asarray(MU))

    def __call__(self, x, t, y, **kwargs):
        mu = self.mu[...][y][:, None, None, :]
        t = t[:, None, None, None]
        var = t**2 * S**2 + (1 - t) ** 2
        return mu + (t * S**2 - (1 - t)) / var * (x - t * mu)


def test_ode_solvers_on_gaussian_flow():
    model = GaussianVelocity()
    z0 = normal(0, (4, 2, 2, 4))
    y = jnp.array([0, 1, 0, 1])
    exact = MU[np.asarray(y)][:, None, None, :] + S * np.asarray(z0)
    for method, n, tol in (("euler", 401, 2e-2), ("heun", 101, 2e-3), ("dopri5", 2, 1e-4)):
        out = sample_ode(model, z0, y, num_steps=n, method=method, rtol=1e-6, atol=1e-7)
        assert np.abs(np.asarray(out) - exact).max() < tol, method


def test_score_from_velocity_is_exact_on_gaussian():
    model = GaussianVelocity()
    x = normal(1, (3, 2, 2, 4))
    t = jnp.array([0.2, 0.5, 0.9])
    y = jnp.array([0, 1, 0])
    mu = MU[np.asarray(y)][:, None, None, :]
    tb = np.asarray(t)[:, None, None, None]
    want = -(np.asarray(x) - tb * mu) / (tb**2 * S**2 + (1 - tb) ** 2)
    score = jax.jit(lambda x, t: Transport().score(model(x, t, y), x, t))(x, t)
    np.testing.assert_allclose(score, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diffusion_form,last_step", [("sigma", "Mean"), ("linear", "Tweedie")])
def test_sde_statistics_on_gaussian(diffusion_form, last_step):
    model = GaussianVelocity()
    n = 2048
    z0 = normal(2, (n, 2, 2, 4))
    y = jnp.arange(n) % 2
    out = sample_sde(
        model,
        z0,
        y,
        jax.random.key(3),
        num_steps=101,
        diffusion_form=diffusion_form,
        last_step=last_step,
    )
    out = np.asarray(out)
    for label in (0, 1):
        samples = out[np.asarray(y) == label].reshape(-1, 4)  # 4096 values per channel
        np.testing.assert_allclose(samples.mean(0), MU[label], atol=0.04)
        np.testing.assert_allclose(samples.std(0), S, atol=0.03)
    # The noise is really injected: samples are not the deterministic ODE map of z0.
    ode_map = MU[np.asarray(y)][:, None, None, :] + S * np.asarray(z0)
    assert np.abs(out - ode_map).mean() > 0.1


def test_sde_refuses_singular_sbdm_and_bad_options():
    model = GaussianVelocity()
    z0, y = jnp.zeros((2, 2, 2, 4)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="SBDM"):
        sample_sde(model, z0, y, jax.random.key(0), num_steps=10, diffusion_form="SBDM")
    with pytest.raises(ValueError, match="last_step"):
        sample_sde(model, z0, y, jax.random.key(0), num_steps=10, last_step="Median")
    with pytest.raises(ValueError, match="method"):
        sample_ode(model, z0, y, num_steps=10, method="rk4")
    with pytest.raises(ValueError, match="cfg_channels"):
        sample_ode(model, z0, y, num_steps=10, cfg_scale=2.0, cfg_channels="some")
    no_null = GaussianVelocity()
    no_null.config = ToyConfig(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="null label"):
        sample_ode(no_null, z0, y, num_steps=10, cfg_scale=2.0)


def test_sampling_sharded_over_the_batch(paper):
    """The reference sample, computed with the batch split over two devices."""
    model, fx = paper
    mesh = sharding.make_mesh(data=2, devices=jax.devices()[:2])
    out = sample_ode(
        model,
        jax.device_put(nhwc(fx["sample_z0"]), sharding.batch_sharding(mesh, 4)),
        jax.device_put(jnp.asarray(fx["sample_y"]), sharding.batch_sharding(mesh, 1)),
        num_steps=9,
        timestep_shift=0.3,
        cfg_scale=4.0,
        cfg_interval_start=0.1,
    )
    assert len(out.sharding.device_set) == 2 and out.sharding.spec[0] is not None
    assert_rel_close(out, nhwc(fx["sample_out"]), 1e-4)


def test_time_grid_matches_reference_shift():
    grid = np.asarray(sampling.time_grid(5, 0.0, 1.0, 0.3))
    t = np.linspace(0, 1, 5)
    np.testing.assert_allclose(grid, 0.3 * t / (1 + (0.3 - 1) * t), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sampling.time_grid(5, 0.0, 1.0, 0.0)), t, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Transport


def test_training_loss_matches_the_reference_formula():
    """Reference Transport.training_losses + train.py: mean MSE + mean(1 - cos over channels)."""
    import torch

    seen = {}

    def record(x, t):
        seen.update(x=np.asarray(x), t=np.asarray(t))

    class Recording(nnx.Module):
        """Records its inputs (from inside jit) and returns a fixed function of them."""

        def __init__(self, train=True):
            self.config = ToyConfig()
            self.w = nnx.Param(jnp.linspace(-1.0, 1.0, 4))
            self.train = train

        def __call__(self, x, t, y, *, train=False, rng=None):
            # training mode with the label-dropout key; loss_at: evaluation, no key
            assert train == self.train and (rng is not None) == self.train
            jax.debug.callback(record, x, t)
            return x * self.w[...] + t[:, None, None, None]

    x1 = normal(5, (6, 3, 3, 4))
    y = jnp.arange(6) % 2
    loss, terms = nnx.jit(training_loss)(Recording(), x1, y, jax.random.key(6))
    jax.effects_barrier()
    xt, t = seen["x"], seen["t"]
    assert np.all((t > 0) & (t < 1))
    tb = t[:, None, None, None]
    x0 = (xt - tb * np.asarray(x1)) / (1 - tb)  # x_t = t x1 + (1 - t) x0
    out = xt * np.linspace(-1.0, 1.0, 4, dtype=np.float32) + tb
    to_torch = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
    out_t, ut = to_torch(out), to_torch(np.asarray(x1) - x0)
    mse = ((out_t - ut) ** 2).mean(dim=(1, 2, 3)).mean()
    cos = (1 - torch.nn.functional.cosine_similarity(out_t, ut, dim=1)).mean(dim=(1, 2)).mean()
    np.testing.assert_allclose(terms["mse"], mse.item(), rtol=1e-5)
    np.testing.assert_allclose(terms["cos"], cos.item(), rtol=1e-5)
    np.testing.assert_allclose(loss, mse.item() + cos.item(), rtol=1e-5)
    assert float(terms["loss"]) == float(loss)

    # loss_at: the same loss at given noise and times (the FP8 fidelity script's validation).
    _, at = loss_at(Recording(train=False), x1, jnp.asarray(x0), jnp.asarray(t), y)
    for key in ("mse", "cos", "loss"):
        np.testing.assert_allclose(at[key], terms[key], rtol=1e-4, err_msg=key)


def test_logit_normal_and_uniform_time_sampling():
    t = np.asarray(Transport().sample_t(jax.random.key(7), 100_000))
    logit = np.log(t / (1 - t))
    assert abs(logit.mean()) < 0.02 and abs(logit.std() - 1) < 0.02
    u = np.asarray(Transport(use_lognorm=False).sample_t(jax.random.key(8), 100_000))
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - np.sqrt(1 / 12)) < 0.01


@pytest.mark.parametrize("path_type", ["Linear", "GVP", "VP"])
def test_path_velocity_is_the_time_derivative(path_type):
    tr = Transport(path_type=path_type)
    x0 = normal(9, (3, 2, 2, 2))
    x1 = normal(10, (3, 2, 2, 2))
    t = jnp.array([0.2, 0.5, 0.8])
    h = 1e-3
    _, ut = tr.plan(t, x0, x1)
    xp, _ = tr.plan(t + h, x0, x1)
    xm, _ = tr.plan(t - h, x0, x1)
    np.testing.assert_allclose(ut, (xp - xm) / (2 * h), rtol=2e-3, atol=2e-3)
    a, _ = tr.alpha(jnp.float32(1.0))
    s, _ = tr.sigma(jnp.float32(0.0))
    assert abs(float(a) - 1) < 1e-6 and abs(float(s) - 1) < 1e-3  # data at t=1, noise at t=0


def test_noise_and_score_predictions_convert_consistently():
    """With the exact noise / score of the Gaussian toy, every prediction gives one velocity."""
    model = GaussianVelocity()
    x = normal(11, (3, 2, 2, 4))
    t = jnp.array([0.3, 0.5, 0.7])
    y = jnp.array([0, 1, 0])

    @jax.jit
    def velocities(x, t):
        v = model(x, t, y)
        score = Transport().score(v, x, t)
        noise = -(1 - t)[:, None, None, None] * score  # x_t = t x1 + (1 - t) eps
        return (
            v,
            Transport(prediction="score").velocity(score, x, t),
            Transport(prediction="noise").velocity(noise, x, t),
        )

    v, from_score, from_noise = velocities(x, t)
    np.testing.assert_allclose(from_score, v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_noise, v, rtol=1e-4, atol=1e-4)
