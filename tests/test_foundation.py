"""The DINOv2 teacher: parity with transformers, timm (the reference) and a real Flax checkpoint,
torch-exact resizing, parameter counts, sharding annotations and bad input."""

import base64
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vavae_jax import foundation as F
from vavae_jax import interpolate
from vavae_jax.runtime import sharding
from vavae_jax.runtime.torch_names import ConversionError


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _nhwc(x):
    return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


def _randomize(module):
    """Random weights everywhere (norm and layer scales around 1), so that every mapping counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = (name.endswith(".weight") and "norm" in name) or "lambda1" in name
            scale = scale or "gamma" in name
            p.copy_(torch.randn_like(p) * 0.2 + float(scale))
    return module.eval()


TINY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
)


@pytest.fixture(scope="module", params=[False, True], ids=["mlp", "swiglu"])
def hf_checkpoint(request, tmp_path_factory):
    """A random transformers Dinov2Model saved with save_pretrained (config.json + safetensors)."""
    config = transformers.Dinov2Config(**TINY, use_swiglu_ffn=request.param)
    model = _randomize(transformers.Dinov2Model(config))
    folder = tmp_path_factory.mktemp(f"dinov2_{request.param}")
    model.save_pretrained(folder)
    return model, folder


def _torch_forward(model, x_nchw):
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).last_hidden_state.numpy()


def test_parity_with_transformers(hf_checkpoint):
    torch_model, folder = hf_checkpoint
    assert (folder / "model.safetensors").is_file()
    model = F.load_dinov2(folder)
    assert model.config.use_swiglu_ffn == torch_model.config.use_swiglu_ffn
    forward = nnx.jit(lambda m, x: m(x))
    rng = np.random.default_rng(0)
    # the trained 4x4 grid, and a non-square 3x5 grid (bicubic position-embedding resampling)
    for hw in [(56, 56), (42, 70)]:
        x = rng.standard_normal((2, 3, *hw)).astype(np.float32)
        ours = forward(model, _nhwc(x))
        ref = _torch_forward(torch_model, x)
        assert ours.shape == ref.shape and ours.dtype == jnp.float32
        assert _rel(ours, ref) < 1e-5, hw


def _timm_names(state_dict, swiglu: bool):
    """transformers checkpoint names -> timm vit_*_patch14_dinov2 names (fused qkv)."""
    sd = {k: v.numpy() for k, v in state_dict.items()}
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "pos_embed": sd.pop("embeddings.position_embeddings"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.projection.bias"),
        "norm.weight": sd.pop("layernorm.weight"),
        "norm.bias": sd.pop("layernorm.bias"),
    }
    sd.pop("embeddings.mask_token")  # timm drops it
    layers = {int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer.")}
    for i in layers:
        t, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [sd.pop(f"{t}attention.{n}_proj.{leaf}") for n in "qkv"]
            out[f"{b}attn.qkv.{leaf}"] = np.concatenate(qkv, axis=0)
            out[f"{b}attn.proj.{leaf}"] = sd.pop(f"{t}attention.o_proj.{leaf}")
            out[f"{b}norm1.{leaf}"] = sd.pop(f"{t}norm1.{leaf}")
            out[f"{b}norm2.{leaf}"] = sd.pop(f"{t}norm2.{leaf}")
            if swiglu:  # timm's SwiGLUPacked: fc1 = [gate; up]
                gate_up = [sd.pop(f"{t}mlp.{n}_proj.{leaf}") for n in ("gate", "up")]
                out[f"{b}mlp.fc1.{leaf}"] = np.concatenate(gate_up, axis=0)
                out[f"{b}mlp.fc2.{leaf}"] = sd.pop(f"{t}mlp.down_proj.{leaf}")
            else:
                out[f"{b}mlp.fc1.{leaf}"] = sd.pop(f"{t}mlp.fc1.{leaf}")
                out[f"{b}mlp.fc2.{leaf}"] = sd.pop(f"{t}mlp.fc2.{leaf}")
        out[f"{b}ls1.gamma"] = sd.pop(f"{t}layer_scale1.lambda1")
        out[f"{b}ls2.gamma"] = sd.pop(f"{t}layer_scale2.lambda1")
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


def test_timm_state_dict_from_renamed_transformers_model(hf_checkpoint):
    torch_model, _ = hf_checkpoint
    swiglu = torch_model.config.use_swiglu_ffn
    state = _timm_names(torch_model.state_dict(), swiglu)
    config = F.Dinov2Config(**TINY, use_swiglu_ffn=swiglu)
    model = F.from_timm_state_dict(state, config)
    assert not np.any(np.asarray(model.embeddings.mask_token[...]))  # absent in timm: zeros
    x = np.random.default_rng(1).standard_normal((2, 3, 42, 70)).astype(np.float32)
    assert _rel(nnx.jit(lambda m, x: m(x))(model, _nhwc(x)), _torch_forward(torch_model, x)) < 1e-5


def test_timm_state_dict_is_strict():
    config = F.Dinov2Config(**TINY)
    torch_model = transformers.Dinov2Model(transformers.Dinov2Config(**TINY))
    state = _timm_names(torch_model.state_dict(), False)
    state["head.weight"] = np.zeros((10, 48), np.float32)
    del state["norm.bias"], state["blocks.1.ls2.gamma"]
    state["blocks.0.attn.proj.weight"] = np.zeros((48, 47), np.float32)
    with pytest.raises(ConversionError) as err:
        F.from_timm_state_dict(state, config)
    msg = str(err.value)
    for expected in ("head.weight", "layernorm.bias", "layer_scale2.lambda1", "o_proj"):
        assert expected in msg
    state = _timm_names(torch_model.state_dict(), False)
    state["reg_token"] = np.zeros((1, 4, 48), np.float32)
    with pytest.raises(ConversionError, match="register tokens"):
        F.from_timm_state_dict(state, config)


@pytest.mark.parametrize("variant", ["vit_large_patch14_dinov2", "vit_giant_patch14_dinov2"])
def test_teacher_matches_reference_timm(variant):
    """The reference path (vavae/ldm/models/foundation_models.py, forward_dinov2) with timm's own
    DINOv2 model factories at a tiny width: bilinear resize 256 -> 224, forward_features[:, 1:]
    (position embeddings resampled 37x37 -> 16x16 with antialiasing), a 16x16 grid."""
    timm = pytest.importorskip("timm")
    tm = timm.create_model(
        variant, pretrained=False, dynamic_img_size=True, embed_dim=48, depth=2, num_heads=4
    )
    tm = _randomize(tm)
    state = {k: v.numpy() for k, v in tm.state_dict().items()}
    config = F.Dinov2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_swiglu_ffn="giant" in variant,
    )
    teacher = F.DinoV2Teacher(F.from_timm_state_dict(state, config))
    assert teacher.feature_dim == 48 and teacher.grid_size == 16
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 256, 256)).astype(np.float32)
    with torch.no_grad():
        xt = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(224, 224), mode="bilinear", align_corners=False
        )
        ref = tm.forward_features(xt)[:, 1:].reshape(2, 16, 16, -1).numpy()
    ours = nnx.jit(lambda t, x: t(x))(teacher, _nhwc(x))
    assert ours.shape == (2, 16, 16, 48)
    assert _rel(ours, ref) < 1e-5


def test_resize_matches_torch_interpolate():
    rng = np.random.default_rng(3)
    # the teacher's image resize: bilinear, align_corners=False, no antialias
    for h, w in [(256, 256), (200, 300)]:
        x = rng.uniform(-1, 1, (2, 3, h, w)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x), size=(224, 224), mode="bilinear", align_corners=False
        ).numpy()
        ours = np.asarray(interpolate.resize_bilinear(_nhwc(x), (224, 224))).transpose(0, 3, 1, 2)
        assert np.abs(ours - ref).max() < 2e-6, (h, w)
    # jax.image.resize antialiases when downsampling: it is not the reference's resize
    x = rng.uniform(-1, 1, (1, 3, 256, 256)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=(224, 224), mode="bilinear", align_corners=False
    ).numpy()
    jax_resize = jax.image.resize(_nhwc(x), (1, 224, 224, 3), "bilinear")
    assert _rel(np.asarray(jax_resize).transpose(0, 3, 1, 2), ref) > 1e-2
    # position-embedding resampling: bicubic with (timm) and without (transformers) antialias
    for n_in, n_out in [(37, 16), (4, 6), (5, 3)]:
        grid = rng.standard_normal((1, 8, n_in, n_in)).astype(np.float32)
        for antialias in (False, True):
            ref = torch.nn.functional.interpolate(
                torch.from_numpy(grid),
                size=(n_out, n_out),
                mode="bicubic",
                align_corners=False,
                antialias=antialias,
            ).numpy()
            m = interpolate.bicubic_matrix(n_in, n_out, antialias=antialias)
            ours = np.einsum("ah,nchw,bw->ncab", m, grid, m)
            assert np.abs(ours - ref).max() < 1e-5, (n_in, n_out, antialias)


# A real transformers 4.57.6 FlaxDinov2Model checkpoint (flax_model.msgpack, 2 layers, width 4)
# and its own last_hidden_state for x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
# (NCHW, as FlaxDinov2Model takes it). transformers 5 has no Flax models, so the file was written
# once in a throwaway venv (transformers==4.57.6, flax, jax 0.10.2) by:
#     cfg = Dinov2Config(hidden_size=4, num_hidden_layers=2, num_attention_heads=2, image_size=4,
#                        patch_size=2, use_swiglu_ffn=swiglu)
#     model = FlaxDinov2Model(cfg, seed=0)
#     rng = np.random.default_rng(1)
#     model.params = jax.tree.map(
#         lambda p: np.asarray(p) + 0.5 * rng.standard_normal(p.shape).astype(np.float32),
#         model.params)
#     y = model(x).last_hidden_state; model.save_pretrained(d)   # -> base64 below
# Only the trained grid is compared: FlaxDinov2Model resamples position embeddings differently
# from the PyTorch model (jax.image.scale_and_translate with a +0.1 offset), and it multiplies
# the stored layer scale by layerscale_value twice (harmless at the hub's 1.0, used here).
FLAX_CHECKPOINTS = {
    # use_swiglu_ffn=False: 3670 bytes
    False: (
        {
            "model_type": "dinov2",
            "hidden_size": 4,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 4,
            "patch_size": 2,
            "use_swiglu_ffn": False,
            "layerscale_value": 1.0,
        },
        "g6plbWJlZGRpbmdzhKljbHNfdG9rZW7HHwGTkwEBBKdmbG9hdDMyxBCoyC8+zerJPoqvJz6p2Sm/qm1hc2tfdG9r"
        "ZW7HHgGTkgEEp2Zsb2F0MzLEELiT6T7/NYM+RFB7vhqljj6wcGF0Y2hfZW1iZWRkaW5nc4GqcHJvamVjdGlvboKk"
        "Ymlhc8cdAZORBKdmbG9hdDMyxBA8qTo+iZgWPsPVaDxi9Ys+pmtlcm5lbMfQAZOUAgIDBKdmbG9hdDMyxMC6Pbu+"
        "DEGyvbHaeL748Jk+rMPwPBc9Cr6N/Mq+PkLuvcEunDs6LBK+qqskP9xu/j6P2ay/mzVyvzKuor0/yEq+eOrjPaZ2"
        "1D2eUIc/9acNv7XBN77iPYM/ulikPvRurT5cooK+Hh9Rv80inz2u/3o9/I4dv+avsb5Anum8Bjzvvk8XRL1y9DU9"
        "hkrDPAqPhL5Mspg++THiPuiBIT51tdS+9Be5Pn6YgL5gP90+HcUIv3MT6z7QXkw60pUevxydI76zcG9zaXRpb25f"
        "ZW1iZWRkaW5nc8dfAZOTAQUEp2Zsb2F0MzLEUCjgCj2UCwE+SOX7vvaYCb/6cso9e4ZqvgKFAT4XusE+iBpTv3lD"
        "BD4aryA/UqASvqSO074toMI+NEz7PX5c5j7F2Cm+jhU8v353Hb2uwmq+p2VuY29kZXKBpWxheWVygqEwhqlhdHRl"
        "bnRpb26CqWF0dGVudGlvboOja2V5gqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEJ97xj6wR8Y9q79Qvxv7GL+ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEAZ6uQ+YV22PhQJpL5OVq67BVpPPtCZgD6Lat4+jUYUPmVhOb2QSAu+n0cLP055j7/X"
        "KXO98gSMOyzsNr+Q4iw+pXF1ZXJ5gqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEFq6pr4vydw+NpuAvaBNqz6ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEDegSE/U7A7PvgV5r7eh0S/3+ZfP9MeOr18EbS+4x6dPbS64b3XRNg+xQVBPKDPlzyl"
        "IrS+TAN0PhUyBb/bG6w+pXZhbHVlgqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEGIQQz/pKEO/s9adv8TrnT6ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEDgpqE/teEBvxM6Ib8DYps+IfzVvrMhhL7luiG+DYiPPpSpVL4OkvA9kMXVvZjC1760"
        "hjK+1SXyvpzuzDsztxS/pm91dHB1dIGlZGVuc2WCpGJpYXPHHQGTkQSnZmxvYXQzMsQQ9uMLv7p9Oj+y19m8X8jc"
        "vKZrZXJuZWzHTgGTkgQEp2Zsb2F0MzLEQFPrej4joV++c/fivY4CXT7ePgY+0l4Vv37V0j6MgJi+GzEDv+eu575A"
        "x1K+aDNRP9XuFb9ZDbs9yCWLvytqC7ysbGF5ZXJfc2NhbGUxgadsYW1iZGExxx0Bk5EEp2Zsb2F0MzLEEH+SuT8E"
        "tWE/THEvPxTRjj+sbGF5ZXJfc2NhbGUygadsYW1iZGExxx0Bk5EEp2Zsb2F0MzLEEEnPrD9eeao/Az3+PwBjjT+j"
        "bWxwgqNmYzGCpGJpYXPHTQGTkRCnZmxvYXQzMsRAMKiXvrAAgb0eehS9tbFePeP8dbwhJLI9at5Vv5Bi1D4dIpO+"
        "ECoWv6lDoz4jnig/MG58PvIGpT39pe6+wse3P6ZrZXJuZWzIAQ8Bk5IEEKdmbG9hdDMyxQEAagTmPkyKDb8TlcS+"
        "WDsfPaskRb8PV9E9CzZavmbiID8u3Pg+piGsvw91OzzLk1C/4vUPP9zuvj0VjYU+KywLv1SuaD+XA4E/knUGv6SF"
        "Pz5DiKW+ZAdvvL4vH79QrG4/jmn1vqdPJL6pboc+vsSpvhLQ3r29OIi+cuWYvZBAEr+mUWC+69jfvcDoI76lKt88"
        "HoYUvqDSuT78uy6+tx+4vcJ2sL5Y6YS+fgEhvxGOgj6U/g+/6s2/vn5FRj5YLko+f2hDvmx5gL8gJk4+057pPYu2"
        "Nb+AKcQ+zSKpvlfSD78YYfo8InC8vYoI9z1mvku/2VdoP0ZXlb5M6EG/KaCbPqNmYzKCpGJpYXPHHQGTkQSnZmxv"
        "YXQzMsQQ46g1vtpTJj4o4S2+T7L0vKZrZXJuZWzIAQ8Bk5IQBKdmbG9hdDMyxQEATTEGPotgv755HKs+W39xvmVp"
        "3L5fjjQ90dtpPugB8b0d/uC+YnGcPq8NYr8zsQO//DjXPDRuLb+Sbz884H+KvKvs5z6H5+u+COKjvg2nIz6Y8Z2/"
        "M9XGP0QbtL6CA7m+ExPbPsKVvLwDmWS/cHmlPvYv2T7KHGy+z6MOvg/dej6xBeq+1iJWPjBauz1+oau+/Lswv1Kv"
        "371jreW+0AT9PhDljD34Is0+s6WJPZ6ZBz4s/MK+8wKwPpeLZT+ObBa+gXOYvhxduL2/Znm++Tu3vljOhz086hS+"
        "95I3P20h1bv3BiY+Jl32PvJWFr4/Pjo/yZSlvvrzzb476DC+io+GvaVub3JtMYKkYmlhc8cdAZORBKdmbG9hdDMy"
        "xBBlXjO/jL+PvDNwVb+XMTI/pXNjYWxlxx0Bk5EEp2Zsb2F0MzLEEOShdT9U1C0/lLsLP/zKTj+lbm9ybTKCpGJp"
        "YXPHHQGTkQSnZmxvYXQzMsQQ8m7kvYmyBb+xd+u+zqq/vaVzY2FsZccdAZORBKdmbG9hdDMyxBD2Vj0/ERy8P97S"
        "yD9+BoE/oTGGqWF0dGVudGlvboKpYXR0ZW50aW9ug6NrZXmCpGJpYXPHHQGTkQSnZmxvYXQzMsQQpXtyPnTnKr/P"
        "LaM+L4p6vKZrZXJuZWzHTgGTkgQEp2Zsb2F0MzLEQE28fz5C5Eo/BKySv6tG9j0jywu/g2CdPhU7K78qUoK+eeLK"
        "PcOXkz7Fbgk9isTLvlTvkL7+FeU+/Q8oOyr9VL+lcXVlcnmCpGJpYXPHHQGTkQSnZmxvYXQzMsQQR/rXPoUeVT4p"
        "mN8+b1osvqZrZXJuZWzHTgGTkgQEp2Zsb2F0MzLEQJU00j5sAgy/j/OVPtWngL4dHKY+a8oEP0vzx76BuO28zk7M"
        "PGZCGT+2SrA+rGobv8MQbj5/1b0++iaKP7X+U7+ldmFsdWWCpGJpYXPHHQGTkQSnZmxvYXQzMsQQYk6JvuirKj/y"
        "ci2/7YcZv6ZrZXJuZWzHTgGTkgQEp2Zsb2F0MzLEQDYOij7sJP8+jymovgxHjD6xIIA90qxCP6UitrsEpgE/Vh/m"
        "vp0Jy73yxjy9MRIXP8ZckD67Sbu+CCCkPgrqxj6mb3V0cHV0gaVkZW5zZYKkYmlhc8cdAZORBKdmbG9hdDMyxBCD"
        "pmS9UewDvlx0xr2D9Vi/pmtlcm5lbMdOAZOSBASnZmxvYXQzMsRAWJfZPYG69j0Y0+C+QPa5PnXnLL+l25G+hy9x"
        "vv0vfj+S30m/yIiVPqLI9j5dW0s+08QXP0cJAL/3q5G/UobFPqxsYXllcl9zY2FsZTGBp2xhbWJkYTHHHQGTkQSn"
        "ZmxvYXQzMsQQNN7NPog4Vj8mN9I+klnDP6xsYXllcl9zY2FsZTKBp2xhbWJkYTHHHQGTkQSnZmxvYXQzMsQQn163"
        "P/TUIz/Q0rk/AsOHP6NtbHCCo2ZjMYKkYmlhc8dNAZOREKdmbG9hdDMyxEDyu469vC3rPIedz738cJ0+4OUePlzt"
        "Mr79zAA/qomcvvfoEj7AJFg+jUk9P5tkgb5THV8/lmS0PeKhxr0tJ6y+pmtlcm5lbMgBDwGTkgQQp2Zsb2F0MzLF"
        "AQCw3pQ++pipPHioEb+iEBC/J42PvhgIsr4xZAs/07MwP2hN6D5DbjE+mbdivkufAz1yS+A+IYiIP4cj7z5TGxC+"
        "EgdDPJWddb62Dsq+ubnAvVwx3D1zRWs/TN3jPEDjKj/QY2E/JElQPXA4TD8707Y+/yJWvh8IAT6p7u47AfkBvmAg"
        "wb3G95s9BTlhPkyN6L4wit65WRZAv+INDD417Zg+JtnHPVcBGD7XJpc+ZhGovu2+/b0aEoM+u30DP5dSVz6+TKU/"
        "3sxBvayp9z6vzyA/+66JvUkC175SsBi/h0KyPfHdDD9bdgs+Qq/KPZjWNr6GdpE+jh2Iv7dNyz0lPYg8o2ZjMoKk"
        "Ymlhc8cdAZORBKdmbG9hdDMyxBBPZy+//zyLP8KWMb8x7Am/pmtlcm5lbMgBDwGTkhAEp2Zsb2F0MzLFAQCcThq/"
        "hXoOPyIl4b6NbK8+vjGYPoGwAT4CVCm/mKyZvmbqVT9nFSS/QwvWvu3Olb0d49E+x3AFPo69vD7c1gi/IXXwPrW6"
        "lD4tuE6/1w1FP0iPkj/vr8W+cNjKPIXFMj/v5D2/15N/v8ikJb/v7pG+EaSVvpfsnD77pQs+gpsev4VIkD6rE3E/"
        "oKYYP8NE/D4xVj48eD75Plrt974ZSr8+awwvvV8NED+qhm8+RskLv/tFkj1vEho/c5URv/htjr5sFse+mi0+v7ZX"
        "9j5gWSY/WxDRPhMZAT7SOBC9c8TqPeBqvL75kuM+EfwFP3rk7T7R6Ie+NrD6PGl1ob1FC2Q/pW5vcm0xgqRiaWFz"
        "xx0Bk5EEp2Zsb2F0MzLEEEgCuD2z53C/7whMPhrucD+lc2NhbGXHHQGTkQSnZmxvYXQzMsQQ69mrP2VJuD/UToI/"
        "gGBqPKVub3JtMoKkYmlhc8cdAZORBKdmbG9hdDMyxBCHtme/N3sfv0Lggb0fuB4+pXNjYWxlxx0Bk5EEp2Zsb2F0"
        "MzLEEFwfrD/fa1Q/VD69PzExXD+pbGF5ZXJub3JtgqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEG1ZtL4xBdo+ERnqvlSp"
        "rr+lc2NhbGXHHQGTkQSnZmxvYXQzMsQQrKbwPrYGhj9EQwq/TUlSPw==",
        "TFbsvsUuyT/9M1C/IEsnwL6K6L61HME/16ZYv1UrKMAQOAm/3KCIPxCejb+ULSLAdd9mvmGR9j8D+nu+YEscwCAW"
        "V7zxPd0/BIycPZG3CsDcK/e+C8++P+ALYL+v4SbAJHpRvv5T0z9J/8w+VcSjv3SWeb5RV6o/nPxGvw0PMMBHhaK+"
        "aTIGQKRswb2QzwvAH3sPvnfNyT9NAPq+jNsrwA==",
    ),
    # use_swiglu_ffn=True: 4340 bytes
    True: (
        {
            "model_type": "dinov2",
            "hidden_size": 4,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 4,
            "patch_size": 2,
            "use_swiglu_ffn": True,
            "layerscale_value": 1.0,
        },
        "g6plbWJlZGRpbmdzhKljbHNfdG9rZW7HHwGTkwEBBKdmbG9hdDMyxBCoyC8+zerJPoqvJz6p2Sm/qm1hc2tfdG9r"
        "ZW7HHgGTkgEEp2Zsb2F0MzLEELiT6T7/NYM+RFB7vhqljj6wcGF0Y2hfZW1iZWRkaW5nc4GqcHJvamVjdGlvboKk"
        "Ymlhc8cdAZORBKdmbG9hdDMyxBA8qTo+iZgWPsPVaDxi9Ys+pmtlcm5lbMfQAZOUAgIDBKdmbG9hdDMyxMC6Pbu+"
        "DEGyvbHaeL748Jk+rMPwPBc9Cr6N/Mq+PkLuvcEunDs6LBK+qqskP9xu/j6P2ay/mzVyvzKuor0/yEq+eOrjPaZ2"
        "1D2eUIc/9acNv7XBN77iPYM/ulikPvRurT5cooK+Hh9Rv80inz2u/3o9/I4dv+avsb5Anum8Bjzvvk8XRL1y9DU9"
        "hkrDPAqPhL5Mspg++THiPuiBIT51tdS+9Be5Pn6YgL5gP90+HcUIv3MT6z7QXkw60pUevxydI76zcG9zaXRpb25f"
        "ZW1iZWRkaW5nc8dfAZOTAQUEp2Zsb2F0MzLEUCjgCj2UCwE+SOX7vvaYCb/6cso9e4ZqvgKFAT4XusE+iBpTv3lD"
        "BD4aryA/UqASvqSO074toMI+NEz7PX5c5j7F2Cm+jhU8v353Hb2uwmq+p2VuY29kZXKBpWxheWVygqEwhqlhdHRl"
        "bnRpb26CqWF0dGVudGlvboOja2V5gqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEJ97xj6wR8Y9q79Qvxv7GL+ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEAZ6uQ+YV22PhQJpL5OVq67BVpPPtCZgD6Lat4+jUYUPmVhOb2QSAu+n0cLP055j7/X"
        "KXO98gSMOyzsNr+Q4iw+pXF1ZXJ5gqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEFq6pr4vydw+NpuAvaBNqz6ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEDegSE/U7A7PvgV5r7eh0S/3+ZfP9MeOr18EbS+4x6dPbS64b3XRNg+xQVBPKDPlzyl"
        "IrS+TAN0PhUyBb/bG6w+pXZhbHVlgqRiaWFzxx0Bk5EEp2Zsb2F0MzLEEGIQQz/pKEO/s9adv8TrnT6ma2VybmVs"
        "x04Bk5IEBKdmbG9hdDMyxEDgpqE/teEBvxM6Ib8DYps+IfzVvrMhhL7luiG+DYiPPpSpVL4OkvA9kMXVvZjC1760"
        "hjK+1SXyvpzuzDsztxS/pm91dHB1dIGlZGVuc2WCpGJpYXPHHQGTkQSnZmxvYXQzMsQQ9uMLv7p9Oj+y19m8X8jc"
        "vKZrZXJuZWzHTgGTkgQEp2Zsb2F0MzLEQFPrej4joV++c/fivY4CXT7ePgY+0l4Vv37V0j6MgJi+GzEDv+eu575A"
        "x1K+aDNRP9XuFb9ZDbs9yCWLvytqC7ysbGF5ZXJfc2NhbGUxgadsYW1iZGExxx0Bk5EEp2Zsb2F0MzLEEH+SuT8E"
        "tWE/THEvPxTRjj+sbGF5ZXJfc2NhbGUygadsYW1iZGExxx0Bk5EEp2Zsb2F0MzLEEEnPrD9eeao/Az3+PwBjjT+j"
        "bWxwgqp3ZWlnaHRzX2lugqRiaWFzx40Bk5Egp2Zsb2F0MzLEgDCol76wAIG9HnoUvbWxXj3j/HW8ISSyPWreVb+Q"
        "YtQ+HSKTvhAqFr+pQ6M+I54oPzBufD7yBqU9/aXuvsLHtz+hWOE+aNQRv1qWx74tIjI9bgFHv3OtrD1tC2u+b/Yc"
        "P8VP9j6zha2/VdCqPC0JT7+eCA4/8iOsPU1kjD4CVgi/pmtlcm5lbMgCDwGTkgQgp2Zsb2F0MzLFAgA3AWs/Zdh/"
        "PwZ6Bb/EUS4+QYumvuxmvLzUeh2/99tqP5xr974HmQO+nTSJPnlkpb5XEPe9QGuUvtI3Zr2a/hK/Ou1Wvtmk7b3Q"
        "bii+jqTaPAVBJL4OXcs+GJQivjvUiL35i6q+RWeFvj/UH78WGYc+CvkSvwv0tb7MATI+hzBVPmvzSL7cbYC/E5FP"
        "PvBp/D3YvTW/rEi/Pv43sL5IqxC/N3McPYYptb3sD6E9tV5Ov6JUZj/v35e+jaBDv2ezpT4MpTe+Z/USPonoGr69"
        "A/y8uGn6PdTJv771KLc+XYdnvmwC4b4w8lY9ZLZaPoSR5L2Pptu+zAygPuJyYr878wK/bvcZPQIgLb+AC3U8MM3W"
        "vEGc6D6pYOy+AeKlvpuNMT5Rjpu/7HTFP38Drr6QPby+HaLePpL8x7x+l2W/4YiePkaz2z4E/lu+9HYGvpV1ej7J"
        "IOm+1mxlPuYfpT2cz6++e14sv6cV671BG+O+SWj8Puvnij1+odE+OY2SPeUq7z2a7Mq+EV6wPlEGZD+QAyq+FVSa"
        "vsHLlL30THa+dSi4vqHMbz06txq+soU7P12hnzxQhTA+wl33PilcGr6shTc/zrShvvgGyr5uxDS+XMM4vVCUNb8e"
        "JiK86R9Rv+QTNT+Olx295A+lvgFe5r6ic0y+sYbcvbBbB7/K/PG+m8bHvat3ZWlnaHRzX291dIKkYmlhc8cdAZOR"
        "BKdmbG9hdDMyxBAVUoW+RXDwPr2lET/mPgM8pmtlcm5lbMgBDwGTkhAEp2Zsb2F0MzLFAQABDXY+Tfopv1fLoD6v"
        "3L687SmAPmEHTD/gWJK/GAUCPrh4DL+i9Zg+HJAnv4cEfr5wGsI9m7CePlIX7jw1ps2+DW+Pvmly5z6sAne6SzJV"
        "v97s1T7fJU0+UTTdPrqPLb5rT9Q+pgUHvz4hkz4qon6+HVuqPuymAT8SLbq+IY6mvJJ4oTyt3Bg/ylC1PpNRHL+i"
        "kGU+lgLAPoNXhz+PLla/URaJvq1cKz/O4yq/1D8av8svgj6acgA/9DSrvgkYhT5iOo09uWVBP9DhADtJpAA/GGXs"
        "vsHBv72NpCq9IckQP0LRlj693sC+ctirPtlTxD4dgEm9PHwAvuo12b1/XVe/pW5vcm0xgqRiaWFzxx0Bk5EEp2Zs"
        "b2F0MzLEENlFwT0yNfA9R5PdvvUQvj6lc2NhbGXHHQGTkQSnZmxvYXQzMsQQPoWgPjJeOT8GLEM/XDP/P6Vub3Jt"
        "MoKkYmlhc8cdAZORBKdmbG9hdDMyxBAQsky/iQiQPv4u8T4/ZUE+pXNjYWxlxx0Bk5EEp2Zsb2F0MzLEEL6iyz+W"
        "TP8+EH4PvosTsT+hMYapYXR0ZW50aW9ugqlhdHRlbnRpb26Do2tleYKkYmlhc8cdAZORBKdmbG9hdDMyxBDmEBm/"
        "4h0nvm3kFr8jswY/pmtlcm5lbMdOAZOSBASnZmxvYXQzMsRAakXhPoU+vL54geQ+i4FOPZGVh71XySM98qDovVPx"
        "mT5kihw+vdtFvh6i/z48V52+5HIMPi1zXT7TpT4/8qB4vqVxdWVyeYKkYmlhc8cdAZORBKdmbG9hdDMyxBBTHV8/"
        "lmS0PeKhxr0tJ6y+pmtlcm5lbMdOAZOSBASnZmxvYXQzMsRA10mUPjSEBDwMPwu/ve0Rv7W8lL7I66S+TsoFP5Ay"
        "Lz/rJeE+byg7PuR6Zr51/fM8ul7kPq4niD/snfI+ktMDvqV2YWx1ZYKkYmlhc8cdAZORBKdmbG9hdDMyxBAvwJs8"
        "IBB3vkZLyL7vqby9pmtlcm5lbMdOAZOSBASnZmxvYXQzMsRAEQrfPRI2aD+tuAI9jL4uP8dIYz9MzSU915FMPzHR"
        "vD5noFO+T+kAPmqCYDwQy8O9TKDbvUVQqD0vYkk+q+XgvqZvdXRwdXSBpWRlbnNlgqRiaWFzxx0Bk5EEp2Zsb2F0"
        "MzLEELXOmbuI3EK//YYFPjeknz6ma2VybmVsx04Bk5IEBKdmbG9hdDMyxEBGNcA9/50VPrLGkz7CXq6+1RnevX5n"
        "fD7kxQA/M1hJPkvLpD9HGQ+9scECP6qhJD8+AIW9RmzRvvHXFr+DDKs9rGxheWVyX3NjYWxlMYGnbGFtYmRhMccd"
        "AZORBKdmbG9hdDMyxBAGD8c/BGORPxMQiz/sdU8/rGxheWVyX3NjYWxlMoGnbGFtYmRhMccdAZORBKdmbG9hdDMy"
        "xBDp56M/UBeLvTTfjj/SzIE/o21scIKqd2VpZ2h0c19pboKkYmlhc8eNAZORIKdmbG9hdDMyxIBPZy+//zyLP8KW"
        "Mb8x7Am/4rUZv4ggDj+IWeO+ES2rPhFnlj6F8wQ+v14nvwGznL6iKFY/cTclv1fn1L70I6a9+RnPPtrWAD6b9r0+"
        "GZ0Iv+Hc8T7fq5E+sRpMv/kbRT+mtpI/fMHEvjX04zy+3jI/SJk9v76zfr9EAia/SiuRvqZrZXJuZWzIAg8Bk5IE"
        "IKdmbG9hdDMyxQIAkrKQvni4mT5TRRM+adsev8CwlD5fY3A/nioUP3mb/T4Uo4Y8nh/4PuuA+75U2L0+HLAOvfKT"
        "Dj/7sn4+fOQNvzB1jj3W6Ro//wcQv1kxiL5uTsy+AApFv2377T6eRCs/jebHPuhg7T2puMS8OvDqPdCHsr75ZOI+"
        "84cHP69e7z5ohoS+Bq5tPSFalr2Ks2Q/lmaWPbyWb7/1wUk+dU1yP+B6rj4mVeA+L8CLPFORer/dNGm/1bwevwgJ"
        "hb3SRy4+vNOzPt58Mb4Dzfc+n2AWvpHBv751XOA+LCjrvjg/r7+ZXwa/k31oPWv3xL/SLC++3bs9vt5eOL+R6UC/"
        "yxZ2vixnkr51kyM/ZvM3PtLiS7+nQea+dra2Pi/jdz8C0T4+7Q8qPozwaD+cqJG8+wsgvrfaML86yIS+djKNP+pa"
        "M7/WMjK8Egoyv7UAbz3dDOE+KxMHvvaKwz6F18E+3BVOPsPLWj8oMsQ+S9wrvrc1qb7/9du+ESttPrP2JL5BKrA/"
        "X2JsP6Dr1b3NtzS+GF1WP1yNbr9pEFC+swfuPkZa5b7p9mC+Ougxvhu+rj78YJ09mLtLPrWsnT7IX5Q8FGAMP2Br"
        "t75FEDe/pjNjv+ICT7+yfY++FlkEP2+9vT2E4JC+WKEDv4uKj770GkO+fjaWvjnlNb8PRIG+F3cHP1ZZi7+rd2Vp"
        "Z2h0c19vdXSCpGJpYXPHHQGTkQSnZmxvYXQzMsQQH2L2vSzEh7/VcLs9d1u/vqZrZXJuZWzIAQ8Bk5IQBKdmbG9h"
        "dDMyxQEAcxWGvxNgOz3Dtmk/djZKPSwvFD+HTBa9KeuJv/vMeD6jrVe+EGs7vzCZxj5iohM+4siCvttq3T4dDty+"
        "hn+kPqIB8L6c9IQ+3kkOv62fPT/uhgU+Hi42P8oB1L60TnW+74bSPvljsL8Hpgi/e9MCP5zuaT50tfY+YrsXvsQA"
        "kj5FRr++cPctv1tTWL+zGo6+IBeNvsz7nr6ZI+O/bIqAvy5ii74ZFgs+psuVvh2r4L4tz5K/2ieCP4BfDL+nf1U/"
        "ajdJP5wIED435JW+JexvPcInE791Dv89WKGmOzsmiT5y1fU+TONcP4XJUL4dlwY/MgfJvmgM5r41WJ++mXP6vqVu"
        "b3JtMYKkYmlhc8cdAZORBKdmbG9hdDMyxBCa8vo+iFnsPhzbIj+jQk+8pXNjYWxlxx0Bk5EEp2Zsb2F0MzLEEHiP"
        "kT8a9jU/mlrZPvKbnD+lbm9ybTKCpGJpYXPHHQGTkQSnZmxvYXQzMsQQM2gJPpyyDb9Z2JU+7PBev6VzY2FsZccd"
        "AZORBKdmbG9hdDMyxBCUFmk/4FEvP65APD+Eouo+qWxheWVybm9ybYKkYmlhc8cdAZORBKdmbG9hdDMyxBCn1vM+"
        "++GQPlF6Fz8ZoYU9pXNjYWxlxx0Bk5EEp2Zsb2F0MzLEEMKysz7hfE8/sPjOPkuYnD8=",
        "tuA5P84+jD9AHTG94brivcxmJz/vg4I/oFe4vYxXyz6j5hc/qr+6P0xQ2T2PASa/vHAWP6morD8AMG05AmERvkco"
        "ND/ygBY/aHfTvXJNaj99Kts+MYG7PyCzKT18p+o9XDqrPXoyeb62BDM/z43zPyjRVT9gf4A/QIUjPS+yGr8gQVG8"
        "wSP2PryQ/D5CdOI/0c8uP4DCbz2Ajwa8y+2/Pw==",
    ),
}


@pytest.mark.parametrize("swiglu", [False, True], ids=["mlp", "swiglu"])
def test_flax_msgpack_checkpoint(swiglu, tmp_path):
    config, blob, expected = FLAX_CHECKPOINTS[swiglu]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "flax_model.msgpack").write_bytes(base64.b64decode(blob))
    model = F.load_dinov2(tmp_path)
    assert model.config.use_swiglu_ffn == swiglu
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    expected = np.frombuffer(base64.b64decode(expected), np.float32).reshape(2, 5, 4)
    assert _rel(nnx.jit(lambda m, x: m(x))(model, _nhwc(x)), expected) < 1e-5


# transformers Dinov2Model("dinov2-large") parameters, counted with torch on the meta device.
# timm's vit_large_patch14_dinov2 (the reference's teacher) has 1024 fewer (no mask_token):
# 304,367,616. The other presets match transformers too (checked once; eval_shape of giant takes
# 20 s): small 22,056,576, base 86,580,480, giant 1,136,480,768.
DINOV2_LARGE_PARAMS = 304_368_640


def test_param_count_large_matches_transformers():
    cfg = F.PRESETS["dinov2-large"]
    abstract = nnx.eval_shape(lambda: F.Dinov2Model(cfg, rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = transformers.Dinov2Model(
            transformers.Dinov2Config(
                hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                image_size=518,
                patch_size=14,
                use_swiglu_ffn=cfg.use_swiglu_ffn,
            )
        )
    torch_count = sum(p.numel() for p in ref.parameters())
    assert F.count_params(abstract) == torch_count == DINOV2_LARGE_PARAMS
    # the logical axes of the weights (mapped to mesh axes by sharding.RULES)
    specs = nnx.get_partition_spec(nnx.state(abstract))
    layer = specs["encoder"]["layer"][0]
    assert tuple(layer["attention"]["q_proj"]["kernel"].get_value()) == ("embed", "heads")
    assert tuple(layer["attention"]["o_proj"]["kernel"].get_value()) == ("heads", "embed")
    assert tuple(layer["mlp"]["fc1"]["kernel"].get_value()) == ("embed", "mlp")
    assert tuple(specs["embeddings"]["position_embeddings"].get_value()) == (None, None, "embed")


def test_hub_configs_give_the_presets():
    # config.json of facebook/dinov2-large and facebook/dinov2-giant (transformers 4.31 era)
    common = dict(
        architectures=["Dinov2Model"],
        hidden_act="gelu",
        image_size=518,
        layer_norm_eps=1e-06,
        layerscale_value=1.0,
        mlp_ratio=4,
        model_type="dinov2",
        num_channels=3,
        patch_size=14,
        qkv_bias=True,
    )
    large = dict(common, hidden_size=1024, num_attention_heads=16, num_hidden_layers=24)
    giant = dict(common, hidden_size=1536, num_attention_heads=24, num_hidden_layers=40)
    giant["use_swiglu_ffn"] = True
    assert F.Dinov2Config.from_hf_dict(large) == F.PRESETS["dinov2-large"]
    assert F.Dinov2Config.from_hf_dict(giant) == F.PRESETS["dinov2-giant"]
    assert F.PRESETS["dinov2-giant"].mlp_hidden_size == 4096  # SwiGLU: 2/3 of 6144
    assert F.HUB_IDS["dinov2-large"] == "facebook/dinov2-large"
    with pytest.raises(ValueError, match="dinov2_with_registers"):
        F.Dinov2Config.from_hf_dict(dict(large, model_type="dinov2_with_registers"))


def test_teacher_is_frozen_sharded_and_checks_input():
    cfg = F.Dinov2Config(**TINY)
    torch_model = _randomize(transformers.Dinov2Model(transformers.Dinov2Config(**TINY)))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    teacher = F.DinoV2Teacher(F.from_transformers_state_dict(state, cfg))
    q = teacher.model.encoder.layer[0].attention.q_proj.kernel
    assert isinstance(q, F.FrozenParam)
    assert F.count_params(teacher) == sum(p.numel() for p in torch_model.parameters())
    assert not jax.tree.leaves(nnx.state(teacher, nnx.Param))  # optimizers over Param skip it
    # frozen weights keep their logical annotations: FSDP over 8 fake devices
    abstract = nnx.eval_shape(lambda: F.DinoV2Teacher(F.Dinov2Model(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh(data=2, fsdp=4)
    shardings = sharding.state_shardings(nnx.state(abstract), mesh, "fsdp")
    q_sharding = shardings["model"]["encoder"]["layer"][0]["attention"]["q_proj"]["kernel"]
    assert q_sharding.get_value().spec == jax.sharding.PartitionSpec("fsdp", None)

    @nnx.jit
    def features_and_grad(teacher, x):
        return teacher(x), jax.grad(lambda x: teacher(x).sum())(x)

    images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
    features, grad = features_and_grad(teacher, images)
    assert features.shape == (2, 16, 16, 48) and teacher.feature_dim == 48
    assert not np.any(np.asarray(grad))  # stop_gradient
    # normalize="imagenet" is the DINOv2 training normalisation; the reference uses none
    imagenet = F.DinoV2Teacher(teacher.model, normalize="imagenet")
    assert _rel(nnx.jit(lambda t, x: t(x))(imagenet, images), features) > 1e-3
    for bad in (np.zeros((1, 3, 64, 64), np.float32), np.zeros((1, 64, 64, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"\[B, H, W, 3\]|floating-point"):
            teacher(jnp.asarray(bad))
    with pytest.raises(ValueError, match="NHWC"):
        teacher.model(jnp.zeros((1, 3, 56, 56)))
    with pytest.raises(ValueError, match="normalize"):
        F.DinoV2Teacher(teacher.model, normalize="clip")


def test_load_errors(tmp_path):
    good = tmp_path / "dinov2"
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(good)
    teacher = F.DinoV2Teacher.from_pretrained(str(good))
    assert teacher.feature_dim == 48
    config = (good / "config.json").read_text()
    # a folder without weights
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text(config)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        F.load_dinov2(empty)
    # a folder without config.json
    (tmp_path / "no_config").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        F.load_dinov2(tmp_path / "no_config")
    # another model's checkpoint (transformers ViT), as saved
    vit = transformers.ViTModel(
        transformers.ViTConfig(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="model_type='vit'"):
        F.load_dinov2(tmp_path / "vit")
    # ... and its weights next to a DINOv2 config.json
    (tmp_path / "vit" / "config.json").write_text(config)
    with pytest.raises(ConversionError, match="unexpected keys.*intermediate.dense"):
        F.load_dinov2(tmp_path / "vit")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub id"):
        F.load_dinov2(tmp_path / "missing")
    with pytest.raises(ValueError, match="is a file"):
        F.load_dinov2(good / "config.json")


def test_hub_id_without_network_or_cache_names_the_fix(tmp_path, monkeypatch):
    """A hub id on a machine with no internet (GPU hosts often) and an empty cache: one error
    that says so and how to pass a local folder, not the hub client's traceback."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(
        FileNotFoundError, match="not in the local Hugging Face cache.*teacher.path"
    ):
        F.load_dinov2("facebook/dinov2-large")
