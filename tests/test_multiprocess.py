"""Two processes with jax.distributed on this machine (CPU, gloo collectives), through the real
launcher: launch/train.py trains the small LightningDiT, is stopped with a checkpoint, resumes,
and ends equal to one uninterrupted process holding the same 2 devices and the same global batch.

Also checked: every process saves its part of the Orbax checkpoint and restores it; only process
0 writes logs and image grids (an audit hook, installed through a `sitecustomize` on the
subprocesses' PYTHONPATH, records every file a process opens for writing or renames into place);
each process reads its own half of every global batch.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lightningdit_jax import data as data_lib
from tests.test_lightningdit_train import write_latents

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, STOP_AFTER = 4, 2
TIMEOUT_S = 300
# Both runs do the same per-device computation; the 2-participant all-reduce is a + b whichever
# way it is done, so we expect (and see) bitwise equality; allow float32 rounding.
RTOL, ATOL = 1e-6, 1e-7

_AUDIT = """
import atexit, os, sys

_out = os.environ.get("MP_TEST_WRITES")
if _out:
    _written = set()

    def _hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (
                mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            ):
                _written.add(os.path.abspath(os.fsdecode(path)))
        elif event == "os.rename":  # os.rename and os.replace: atomic writes
            _written.add(os.path.abspath(os.fsdecode(args[1])))

    def _dump():
        text = "\\n".join(sorted(_written))
        with open(_out, "w") as f:
            f.write(text)

    sys.addaudithook(_hook)
    atexit.register(_dump)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(tmp, devices: int, writes: pathlib.Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        # Not the 8 fake devices of conftest.py: each process gets exactly `devices`. Both runs
        # compile with the same cheaper LLVM settings (halves the compile time).
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true",
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        PYTHONPATH=os.pathsep.join([str(tmp / "audit"), str(ROOT)]),
    )
    env.pop("MP_TEST_WRITES", None)
    if writes is not None:
        env["MP_TEST_WRITES"] = str(writes)
    return env


def _command(data_dir, workdir, *extra) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "launch" / "train.py"),
        "--config=configs/lightningdit_xl_vavae_f16d32.py:tiny,small",  # 8x8x8 latents
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.global_batch_size=8",
        f"--config.total_steps={STEPS}",
        "--config.mesh.data=1",
        "--config.mesh.fsdp=2",  # parameters split across the two processes
        "--config.checkpoint_every_steps=1000",
        "--config.log_every_steps=1",
        "--config.image_every_steps=1000",  # one grid, at the last step
        "--config.grid_sample_steps=2",
        "--config.num_grid_images=2",
        "--config.progress_bar=False",
        *extra,
    ]


def _run(procs: list[tuple[str, subprocess.Popen, pathlib.Path]]) -> list[str]:
    """Waits for all; if one fails (or time runs out), stops the rest and shows every stderr."""
    deadline = time.monotonic() + TIMEOUT_S
    failed = None
    while any(p.poll() is None for _, p, _ in procs):
        bad = [n for n, p, _ in procs if p.poll() not in (None, 0)]
        if bad or time.monotonic() > deadline:
            failed = f"{bad} failed" if bad else f"timed out after {TIMEOUT_S} s"
            break
        time.sleep(0.2)
    for _, p, _ in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    errs = [log.read_text() for _, _, log in procs]
    if failed is None and any(p.returncode for _, p, _ in procs):
        failed = f"exit codes {[p.returncode for _, p, _ in procs]}"
    if failed:
        report = "\n".join(
            f"--- {n} (rc {p.returncode}) ---\n{e[-6000:]}" for (n, p, _), e in zip(procs, errs)
        )
        pytest.fail(f"{failed}\n{report}")
    return errs


def _spawn(name, cmd, env, log: pathlib.Path) -> tuple[str, subprocess.Popen, pathlib.Path]:
    """Starts `cmd`; its stderr (the trainer's log) goes to `log`, not to a pipe that could fill."""
    with log.open("w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=f)
    return name, p, log


def _pair(tmp, data_dir, workdir, tag, *extra) -> list[str]:
    port = _free_port()
    procs = [
        _spawn(
            f"process {i} ({tag})",
            _command(
                data_dir,
                workdir,
                f"--coordinator_address=localhost:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *extra,
            ),
            _env(tmp, 1, tmp / f"writes_{tag}_{i}.txt"),
            tmp / f"stderr_{tag}_{i}.txt",
        )
        for i in range(2)
    ]
    return _run(procs)


def _read_state(workdir: pathlib.Path, step: int) -> dict:
    """The checkpoint's state item as numpy arrays (no devices or shardings needed)."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return ckptr.restore(path, restore_args=args)


def _metrics(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _writes(tmp, tag, i, workdir) -> list[str]:
    paths = (tmp / f"writes_{tag}_{i}.txt").read_text().splitlines()
    return [os.path.relpath(p, workdir) for p in paths if p.startswith(str(workdir) + os.sep)]


@pytest.mark.slow
def test_two_processes_stop_resume_equal_one_process(tmp_path):
    import jax

    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / "sitecustomize.py").write_text(textwrap.dedent(_AUDIT))
    data_dir = tmp_path / "latents"
    write_latents(data_dir, n=32)
    one, two = tmp_path / "one", tmp_path / "two"

    # One process, 2 devices, uninterrupted (started first: it overlaps the pair's start-up).
    ref = _spawn(
        "single process",
        _command(data_dir, one, "--distributed=off"),
        _env(tmp_path, 2, None),
        tmp_path / "stderr_single.txt",
    )
    try:
        # Two processes, 1 device each: STOP_AFTER steps and a checkpoint, then resume.
        errs_a = _pair(tmp_path, data_dir, two, "a", f"--stop_after_steps={STOP_AFTER}")
        errs_b = _pair(tmp_path, data_dir, two, "b")
        _run([ref])
    finally:
        if ref[1].poll() is None:
            ref[1].kill()
            ref[1].wait()

    for i in range(2):
        assert f"process {i}/2, 1 local / 2 global devices" in errs_a[i], errs_a[i][-3000:]
        assert f"resumed from step {STOP_AFTER}" in errs_b[i], errs_b[i][-3000:]
    assert sorted(int(p.name) for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == [
        STOP_AFTER,
        STEPS,
    ]

    # ---- the final state equals the single process's -----------------------------------------
    a, b = _read_state(one, STEPS), _read_state(two, STEPS)
    assert int(a["step"]) == int(b["step"]) == STEPS
    flat_a = jax.tree.leaves_with_path(a)
    flat_b = jax.tree.leaves_with_path(b)
    assert [k for k, _ in flat_a] == [k for k, _ in flat_b]
    max_diff = 0.0
    for (key, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(key))
        if np.size(x):
            max_diff = max(max_diff, float(np.max(np.abs(np.float64(x) - np.float64(y)))))
    # The runs really trained: parameters moved away from the step-STOP_AFTER checkpoint.
    mid = _read_state(two, STOP_AFTER)
    moved = max(
        float(np.max(np.abs(x - y)))
        for x, y in zip(jax.tree.leaves(mid["params"]), jax.tree.leaves(b["params"]))
    )
    assert moved > 100 * ATOL, (moved, max_diff)

    # The losses of every step agree too (each depends on the global batch of that step).
    ma, mb = _metrics(one), _metrics(two)
    assert [m["step"] for m in mb] == list(range(1, STEPS + 1))  # one line per step: process 0
    for x, y in zip(ma, mb):
        for k in ("train/loss", "train/grad_norm", "train/param_norm"):
            np.testing.assert_allclose(y[k], x[k], rtol=RTOL, err_msg=f"step {x['step']} {k}")

    # ---- who wrote what --------------------------------------------------------------------
    for tag in ("a", "b"):
        w0, w1 = _writes(tmp_path, tag, 0, two), _writes(tmp_path, tag, 1, two)
        assert os.path.join("logs", "metrics.jsonl") in w0
        outside = [p for p in w1 if not p.startswith("checkpoints" + os.sep)]
        assert not outside, f"process 1 wrote {outside} ({tag}); only process 0 logs"
        # Every process saves its own part: here its data-iterator state (written into Orbax's
        # temporary folder, which process 0 renames; the array shards go through tensorstore).
        for i, w in enumerate((w0, w1)):
            mine = f"process_{i}-of-2.json"
            assert any(p.startswith("checkpoints") and p.endswith(os.sep + mine) for p in w), w
    assert any(p.startswith("samples" + os.sep) for p in _writes(tmp_path, "b", 0, two))
    for step in (STOP_AFTER, STEPS):
        for i in range(2):
            assert (two / "checkpoints" / str(step) / "data" / f"process_{i}-of-2.json").is_file()
            assert (two / "checkpoints" / str(step) / "state" / f"ocdbt.process_{i}").is_dir()


def test_hosts_read_their_slice_of_the_same_global_batches(tmp_path):
    """1 host or 2 (or 4) hosts: the same global batches, hosts in process order, also across
    epochs (32 records, 10 batches of 8) and after a resume from the iterator state."""
    write_latents(tmp_path, n=32)
    cfg = data_lib.default_data_config()
    cfg.data_dir = str(tmp_path)

    def iterators(count):
        return [
            data_lib.make_train_iterator(cfg, 8, seed=5, shard_index=h, shard_count=count)[0]
            for h in range(count)
        ]

    (one,) = iterators(1)
    ref = [next(one) for _ in range(10)]
    for count in (2, 4):
        hosts = iterators(count)
        for step, batch in enumerate(ref[:6]):
            parts = [next(h) for h in hosts]
            for key in ("latent", "label"):
                np.testing.assert_array_equal(
                    np.concatenate([p[key] for p in parts]), batch[key], err_msg=f"{count} {step}"
                )
            assert not np.array_equal(parts[0]["latent"], parts[1]["latent"])
        states = [h.get_state() for h in hosts]
        resumed = iterators(count)
        for h, s in zip(resumed, states):
            h.set_state(s)
        for batch in ref[6:]:
            got = np.concatenate([next(h)["latent"] for h in resumed])
            np.testing.assert_array_equal(got, batch["latent"])


def test_global_batch_sampler_covers_each_batch_once_with_workers():
    """grain with W workers: worker k % W reads local index k and emits whole batches, round
    robin. Every global batch must be stream positions [n * G, (n + 1) * G) once each."""
    for count in (1, 2, 3):
        for workers in (0, 1, 2, 3):
            per_host = 4
            s = data_lib.GlobalBatchSampler(100, per_host, count, workers, seed=0)
            w = max(workers, 1)
            for n in range(7):  # host batch n = batch n // w of worker n % w, on every host
                local = [n % w + w * ((n // w) * per_host + j) for j in range(per_host)]
                pos = sorted(s.position(k * count + h) for h in range(count) for k in local)
                g = per_host * count
                assert pos == list(range(n * g, (n + 1) * g)), (count, workers, n)
