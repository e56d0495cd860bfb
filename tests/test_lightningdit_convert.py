"""Official LightningDiT checkpoints: `.pt` files written with torch -> NNX / Orbax, strictly."""

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightningdit_jax import PRESETS
from lightningdit_jax.convert import (
    ConversionError,
    convert_file,
    expected_keys,
    from_torch_state_dict,
    load_converted,
    load_torch_checkpoint,
)
from tests.test_lightningdit_model import assert_rel_close, forward, load_reference, nhwc


@pytest.fixture(scope="module")
def paper(fixtures_dir):
    return load_reference(fixtures_dir, "lightningdit_tiny_paper")


def _save_pt(path, obj):
    """torch.save of nested dicts with numpy leaves turned into tensors (the official format)."""
    import torch

    def to_torch(x):
        if isinstance(x, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(x))
        if isinstance(x, dict):
            return {k: to_torch(v) for k, v in x.items()}
        return x

    torch.save(to_torch(obj), path)
    return path


def _perturbed(state, seed=0):
    """Other trained weights (the buffers pos_embed and feat_rope.* are fixed tables)."""
    rng = np.random.default_rng(seed)
    fixed = ("pos_embed", "feat_rope.")
    return {
        k: v if k.startswith(fixed) else (v + 0.05 * rng.standard_normal(v.shape)).astype(v.dtype)
        for k, v in state.items()
    }


def _params(model):
    return {
        ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }


def as_if_saved_on_gpu(state_dir) -> None:
    """Rewrites the sharding metadata of an Orbax checkpoint as a GPU host writes it ("cuda:0"):
    a file converted on one platform and restored on another (the H200 run of issue 18 failed
    with "Topology mismatch detected" when a CPU-converted init was restored on the GPU)."""
    path = pathlib.Path(state_dir) / "_sharding"
    text = path.read_text()
    assert "cpu:0" in text, text[:200]
    path.write_text(text.replace("cpu:0", "cuda:0"))


def test_official_checkpoint_converts_to_orbax_with_equal_outputs(tmp_path, paper):
    config, state, fx = paper
    adam_state = {
        i: {"step": np.array(10.0, np.float32), "exp_avg": v, "exp_avg_sq": v**2}
        for i, v in enumerate(state.values())
    }
    checkpoint = {  # reference train.py: model, ema, opt, config
        "model": _perturbed(state),
        "ema": state,
        "opt": {"state": adam_state, "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.95)}]},
        "config": {"model": {"model_type": "LightningDiT-XL/1"}, "train": {"max_steps": 80000}},
    }
    pt = _save_pt(tmp_path / "0080000.pt", checkpoint)

    ema_dir = convert_file(pt, tmp_path / "ema", config)  # use_ema=True by default
    model = load_converted(ema_dir, config)
    out = forward(model, nhwc(fx["x"]), jnp.asarray(fx["t"]), jnp.asarray(fx["y"]))
    assert_rel_close(out, nhwc(fx["out"]), 1e-5)

    raw_dir = convert_file(pt, tmp_path / "raw", config, use_ema=False)
    raw = _params(load_converted(raw_dir, config))
    direct = _params(from_torch_state_dict(checkpoint["model"], config))
    assert raw.keys() == direct.keys()
    for k in raw:
        np.testing.assert_array_equal(raw[k], direct[k], err_msg=k)
    assert not np.array_equal(
        raw["blocks.attn.qkv.kernel"], _params(model)["blocks.attn.qkv.kernel"]
    )

    as_if_saved_on_gpu(raw_dir / "state")  # converted on another platform: still restores
    np.testing.assert_array_equal(
        _params(load_converted(raw_dir, config))["blocks.attn.qkv.kernel"],
        raw["blocks.attn.qkv.kernel"],
    )

    with pytest.raises(FileExistsError):
        convert_file(pt, tmp_path / "ema", config)
    other = dataclasses.replace(config, wo_shift=True)
    with pytest.raises(ValueError, match="wo_shift"):
        load_converted(ema_dir, other)


def test_bare_ddp_state_dict_and_missing_ema(tmp_path, paper):
    config, state, _ = paper
    bare = _save_pt(tmp_path / "bare.pt", {f"module.{k}": v for k, v in state.items()})
    loaded = load_torch_checkpoint(bare)
    assert loaded.keys() == state.keys()
    params = _params(from_torch_state_dict(loaded, config))
    np.testing.assert_array_equal(
        params["blocks.attn.qkv.kernel"][1], state["blocks.1.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(
        params["x_embedder.proj.kernel"], state["x_embedder.proj.weight"].transpose(2, 3, 1, 0)
    )
    model_only = _save_pt(tmp_path / "model_only.pt", {"model": state})
    with pytest.raises(ValueError, match="use_ema=False"):
        load_torch_checkpoint(model_only)
    assert load_torch_checkpoint(model_only, use_ema=False).keys() == state.keys()
    with pytest.raises(FileNotFoundError):
        load_torch_checkpoint(tmp_path / "absent.pt")


def test_strict_conversion_lists_every_problem(paper):
    config, state, _ = paper
    bad = dict(state)
    bad["blocks.2.norm1.weight"] = bad["blocks.1.norm1.weight"]  # depth is 2
    bad["y_embedder.extra"] = np.zeros(3, np.float32)
    del bad["final_layer.linear.bias"]
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"].T  # [in, out]: wrong layout
    bad["feat_rope.freqs_cos"] = bad["feat_rope.freqs_cos"] * 0.5
    with pytest.raises(ConversionError) as err:
        from_torch_state_dict(bad, config)
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    for needle in (
        "blocks.2.norm1.weight",
        "y_embedder.extra",
        "final_layer.linear.bias",
        "blocks.0.attn.qkv.weight (64, 192), expected (192, 64)",
        "feat_rope.freqs_cos",
    ):
        assert needle in msg, needle
    # A checkpoint of another switch set fails loudly too (here: GELU MLP instead of SwiGLU).
    with pytest.raises(ConversionError, match="mlp.w12"):
        from_torch_state_dict(state, dataclasses.replace(config, use_swiglu=False))


def test_expected_keys_of_the_full_xl1_checkpoint():
    keys = expected_keys(PRESETS["XL/1"])
    assert "blocks.27.adaLN_modulation.1.weight" in keys and "blocks.28.norm1.weight" not in keys
    assert "t_embedder.mlp.2.weight" in keys and "y_embedder.embedding_table.weight" in keys
    assert "pos_embed" in keys and "x_embedder.proj.weight" in keys
    # x_embedder (2), pos_embed, t_embedder (4), y_embedder; per block norm1, norm2 and w/b of
    # qkv, proj, w12, w3, adaLN; final layer norm and w/b of linear, adaLN. RoPE buffers apart.
    assert len(keys) == 8 + 28 * 12 + 5
