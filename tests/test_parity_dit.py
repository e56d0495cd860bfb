"""The LightningDiT training-parity harness (launch/parity/dit_*.py, issue 18) on our side, tiny:
dit_make_init.py writes the plan (batch list, injected t / noise / label drop) and an init in
the reference's state-dict format converted with lightningdit_jax.convert; dit_ours.py trains on
that batch list from the converted init and writes the per-step log and checkpoints in the
exchange format. The reference side needs a hustvl/LightningDiT clone and runs on the GPU only.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from lightningdit_jax import convert
from lightningdit_jax import data as data_lib
from lightningdit_jax.model import PRESETS
from tests.conftest import CHEAP_COMPILE_FLAGS

ROOT = pathlib.Path(__file__).resolve().parents[1]
PARITY = ROOT / "launch" / "parity"
SHAPE = (8, 8, 8)  # the `tiny` preset's latents
LOG_KEYS = ("loss", "mse", "cos", "grad_norm", "param_norm")


def write_latents(directory, n, seed):
    """An extraction folder as launch/extract_latents.py writes it: [n, 2, 8, 8, 8] latents
    (image, flip) with a per-channel offset and scale, labels 0..9, index and stats."""
    rs = np.random.RandomState(seed)
    z = (rs.randn(n, 2, *SHAPE) * np.linspace(0.5, 2, SHAPE[-1]) + np.arange(SHAPE[-1])).astype(
        np.float32
    )
    labels = (np.arange(n) % 10).astype(np.int32)
    os.makedirs(directory)
    data_lib.write_shard(os.path.join(directory, "latents-00000.array_record"), z, labels)
    data_lib.save_index(
        str(directory),
        {
            "shape": [2, *SHAPE],
            "dtype": "float32",
            "num_classes": 10,
            "shards": [{"file": "latents-00000.array_record", "count": n}],
        },
    )
    acc = data_lib.StatsAccumulator(SHAPE[-1])
    acc.update(z[:, 0])
    data_lib.save_stats(os.path.join(directory, data_lib.STATS_FILE), *acc.result())
    return z, labels


def run(script, *args):
    # The cheap compile of conftest.py: the checks below read what the scripts write.
    flags = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_COMPILE_FLAGS}"
    proc = subprocess.run(
        [sys.executable, str(PARITY / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": flags},
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def read_log(path):
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
    return rows[0]["meta"], rows[1:-1], rows[-1]["end"]


def params(model):
    from flax import nnx

    return {
        ".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
    }


@pytest.mark.slow
def test_our_side_trains_on_the_batch_list_from_the_converted_init(tmp_path):
    z, labels = write_latents(tmp_path / "train", 24, seed=0)
    write_latents(tmp_path / "val", 10, seed=1)
    work = tmp_path / "work"
    run(
        "dit_make_init.py",
        f"--work={work}",
        f"--train_latents={tmp_path / 'train'}",
        f"--val_latents={tmp_path / 'val'}",
        "--preset=tiny",
        "--batch=4",
        "--steps=4",
        "--inject_steps=2",
        "--init_from=ours",  # no reference clone here: our init, in the reference's format
        "--val_count=0",
        "--val_t=2",
        "--per_class=1",
    )
    plan = json.loads((work / "plan" / "plan.json").read_text())
    assert (plan["preset"], plan["batch"], plan["inject_steps"]) == ("tiny", 4, 2)
    with np.load(work / "plan" / "batches.npz") as f:
        index, flip = f["index"], f["flip"]
    with np.load(work / "plan" / "inject.npz") as f:
        t, noise, drop = f["t"], f["noise"], f["drop"]
    # The reference loader's order: an epoch is a permutation (24 records, batch 4: 6 batches).
    assert index.shape == flip.shape == (4, 4) and len(set(index.ravel())) == 16
    assert set(flip.ravel()) <= {0, 1}
    assert t.shape == drop.shape == (2, 4) and noise.shape == (2, 4, *SHAPE)
    assert ((t > 0) & (t < 1)).all()

    run("dit_ours.py", "train", f"--work={work}", "--run=ours", "--ckpt_steps=0,4")
    meta, rows, end = read_log(work / "logs" / "ours.jsonl")
    assert (meta["side"], meta["steps"], meta["inject_steps"]) == ("ours", 4, 2)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["injected"] for r in rows] == [True, True, False, False]
    for r in rows:
        assert set(LOG_KEYS) <= set(r) and np.isfinite([r[k] for k in LOG_KEYS]).all()
        np.testing.assert_allclose(r["loss"], r["mse"] + r["cos"], rtol=1e-6)
    assert end["checkpoints"] == [0, 4]

    # Step 0 by hand from the files: the converted init outputs zero (zero-initialised output
    # layer), so mse = mean((x1 - x0)^2) for the batch list's latents x1 and the injected
    # noise x0 (the Linear path's velocity target is x1 - x0), and 1 - cos = 1.
    stats = data_lib.load_stats(str(tmp_path / "train"))
    x1 = data_lib.normalize(z[index[0], flip[0]], stats["mean"], stats["std"])
    np.testing.assert_allclose(rows[0]["mse"], np.mean((x1 - noise[0]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(rows[0]["cos"], 1.0, rtol=1e-6)

    # The step-0 checkpoint (our state -> the reference's names and layouts) converts back to
    # the init exactly; after 4 steps the weights moved and the EMA (0.9999) barely.
    config = PRESETS["tiny"]
    init = params(convert.load_converted(work / "init" / "nnx", config))
    with np.load(work / "ckpt" / "ours" / "step_0000000.npz") as f:
        step0 = {k[len("model/") :]: f[k] for k in f.files if k.startswith("model/")}
    back = params(convert.from_torch_state_dict(step0, config))
    assert back.keys() == init.keys()
    for k in init:
        np.testing.assert_array_equal(back[k], init[k], err_msg=k)
    with np.load(work / "ckpt" / "ours" / "step_0000004.npz") as f:
        model = {k[len("model/") :]: f[k] for k in f.files if k.startswith("model/")}
        ema = {k[len("ema/") :]: f[k] for k in f.files if k.startswith("ema/")}
    key = "final_layer.linear.weight"  # zero at the init, moved by every update
    # Adam moves each weight by at most a few lr (2e-4) a step; the EMA (decay 0.9999) holds
    # 1e-4 of each of the 4 updated values: below 1e-4 * (1 + 2 + 3 + 4) * 3 * lr = 6e-7.
    assert np.abs(model[key]).max() > 1e-5
    assert 0 < np.abs(ema[key]).max() < 1e-6
