"""vavae_jax.checkpoints: our tokenizer formats and the one loader, `load_autoencoder`."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vavae_jax import checkpoints
from vavae_jax import model as vae_model
from vavae_jax.runtime import checkpoint as ckpt_lib
from vavae_jax.train_step import Generator

TINY = vae_model.AutoencoderConfig(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(),
    z_channels=4,
    embed_dim=4,
    resolution=16,
)


def _fake_run(workdir: pathlib.Path, *, ema: bool, teacher_dim: int | None, disc=None) -> Generator:
    """A VA-VAE trainer run folder: config.json and a checkpoint whose state holds the
    generator (and its EMA copy) and, with `disc`, that PatchGAN as the trainer saves them."""
    gen = Generator(TINY, teacher_dim, 0.25, rngs=nnx.Rngs(3))
    params = nnx.state(gen, nnx.Param)
    state = {"gen": params, "step": jnp.zeros((), jnp.int32)}
    if ema:
        state["ema"] = jax.tree.map(lambda x: x + 1.0, params)
    model = {f: getattr(TINY, f) for f in checkpoints.AUTOENCODER_ARCH_FIELDS}
    config = dict(trainer="vavae", dtype="float32", model=model, ema=dict(enabled=ema))
    if disc is not None:
        state["disc"], state["disc_stats"] = (
            nnx.state(disc, nnx.Param),
            nnx.state(disc, nnx.BatchStat),
        )
        config["loss"] = dict(disc_ndf=disc.config.ndf, disc_num_layers=disc.config.n_layers)
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps(config))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(5, state, config=config)
    ckpt.close()
    return gen


def _params(module):
    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("ema", [False, True])
@pytest.mark.slow
def test_run_folder_loads_and_initialises_a_generator(tmp_path, ema):
    from vavae_jax.discriminator import DiscriminatorConfig, NLayerDiscriminator

    def patchgan(seed, ndf=8):
        return NLayerDiscriminator(DiscriminatorConfig(ndf=ndf, n_layers=2), rngs=nnx.Rngs(seed))

    saved_disc = patchgan(4) if ema else None  # one run with a PatchGAN, one without
    if saved_disc is not None:  # BatchNorm statistics that differ from a fresh init's
        stats = nnx.state(saved_disc, nnx.BatchStat)
        nnx.update(saved_disc, jax.tree.map(lambda x: x + 0.5, stats))
    saved = _fake_run(tmp_path / "run", ema=ema, teacher_dim=6, disc=saved_disc)
    shift = 1.0 if ema else 0.0
    ae, info = checkpoints.load_autoencoder(tmp_path / "run")
    assert info["ref"] == dict(
        path=str(tmp_path / "run"),
        config=info["ref"]["config"],
        step=5,
        weights="ema" if ema else "gen",
    )
    assert checkpoints.autoencoder_config(info["ref"]["config"]) == TINY
    for got, want in zip(_params(ae), _params(saved.autoencoder)):
        np.testing.assert_array_equal(got, np.asarray(want) + shift)
    # init_from a run folder: the autoencoder, the VF projection and logvar.
    gen = Generator(TINY, 6, 0.0, rngs=nnx.Rngs(9))
    checkpoints.load_into_generator(gen, tmp_path / "run", TINY)
    for got, want in zip(_params(gen), _params(saved)):
        np.testing.assert_array_equal(got, np.asarray(want) + shift)
    # ... and its PatchGAN, weights and BatchNorm statistics (False: the run had none).
    disc = patchgan(9)
    assert checkpoints.load_into_discriminator(disc, tmp_path / "run", TINY) == ema
    if ema:
        got, want = checkpoints.flat_params(disc), checkpoints.flat_params(saved_disc)
        assert set(got) == set(want) and any("mean" in k for k in got)
        for k in want:
            np.testing.assert_array_equal(got[k].get_value(), want[k].get_value(), k)
        with pytest.raises(ValueError, match="run's PatchGAN"):
            checkpoints.load_into_discriminator(patchgan(9, ndf=16), tmp_path / "run", TINY)
    other = vae_model.AutoencoderConfig(**{**TINY.__dict__, "ch": 64})
    with pytest.raises(ValueError, match=r"run's autoencoder differs.*'ch': \(32, 64\)"):
        checkpoints.load_into_generator(gen, tmp_path / "run", other)
    with pytest.raises(ValueError, match="PyTorch checkpoint: pass its AutoencoderConfig"):
        (tmp_path / "x.pt").write_bytes(b"")
        checkpoints.load_autoencoder(tmp_path / "x.pt")


def test_checkpoint_modules_import_one_way():
    """convert (the PyTorch mapping) and checkpoints (our formats) never import the trainer,
    not even inside a function; the trainer reaches checkpoints, never convert."""
    root = pathlib.Path(__file__).resolve().parents[1] / "vavae_jax"
    trainer = re.compile(r"from vavae_jax import (.*\b)?train\b(?!_)|import vavae_jax\.train\b")
    for name in ("convert.py", "checkpoints.py"):
        assert not trainer.search((root / name).read_text()), name
    assert not re.search(r"\bconvert\b", (root / "train.py").read_text())
    to_checkpoints = re.compile(
        r"from vavae_jax(\.checkpoints)? import .*checkpoints|vavae_jax\.checkpoints import"
    )
    assert not to_checkpoints.search((root / "convert.py").read_text())


def test_restore_part_reads_only_the_named_entries(tmp_path):
    """`Checkpointer.restore_part`: the named top-level entries of the saved state, restored
    into the given shapes (sampling reads the EMA weights, not Adam's moments); an entry the
    checkpoint lacks is a KeyError that names it and what the checkpoint has, or left out when
    it is optional."""
    state = {"ema": {"w": jnp.arange(4.0)}, "opt": {"mu": jnp.ones(3)}, "step": jnp.int32(7)}
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", async_save=False)
    try:
        ckpt.save(7, state)
        assert ckpt.state_entries(7) == {"ema", "opt", "step"}
        part = ckpt.restore_part(7, {"ema": ckpt_lib.abstract_like(state["ema"])})
        assert set(part) == {"ema"}
        np.testing.assert_array_equal(part["ema"]["w"], np.arange(4.0))
        with pytest.raises(KeyError, match=r"no state entries \['fp8'\].*'ema', 'opt', 'step'"):
            ckpt.restore_part(7, {"fp8": ckpt_lib.abstract_like(state["ema"])})
        # An optional entry the checkpoint lacks is left out; the others are still read.
        both = {k: ckpt_lib.abstract_like(state["ema"]) for k in ("ema", "fp8")}
        assert set(ckpt.restore_part(7, both, optional=("fp8",))) == {"ema"}
    finally:
        ckpt.close()
