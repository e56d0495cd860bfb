"""What the A/B scripts of BENCHMARKS.md share: the trainer's config at a given size, the
timing loop, and the alternating comparison of patched variants of the trainer's step.

A variant is a function that patches the model (or nothing); it runs before the step is traced.
Each case compiles the trainer's step once per variant, then times the variants alternately,
`rounds` rounds of `iters` steps each, each round from a fresh state (two XL/1 states at batch
128 do not fit beside the step on an 80 GB GPU), so that drift between rounds shows.
"""

import json
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lightningdit_jax import train as dit_train  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402


def load_config(preset, b):
    """configs/lightningdit_xl_vavae_f16d32.py for `preset` at global batch `b`, one device, bf16,
    layer loop, no remat."""
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "configs/lightningdit_xl_vavae_f16d32.py"
    spec = importlib.util.spec_from_file_location("dit_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset)
    config.global_batch_size = b
    config.dtype = "bfloat16"
    config.model.remat_policy = "none"
    config.model.scan_layers = False
    config.mesh.num_devices = 1
    return config


def time_it(compiled, state, batch, bits, iters):
    """3 warm-up steps, then the median of `iters` synchronised steps; returns the last state."""
    times = []
    for i in range(3 + iters):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, bits[i % 2])
        jax.block_until_ready(metrics)
        if i >= 3:
            times.append(time.perf_counter() - t)
    return state, statistics.median(times), float(metrics["train/loss"])


def random_batch(mcfg, b):
    shape = (b, mcfg.input_size, mcfg.input_size, mcfg.in_channels)
    return dict(
        latent=jax.random.normal(jax.random.key(1), shape, jnp.float32),
        label=jax.random.randint(jax.random.key(2), (b,), 0, mcfg.num_classes),
    )


def trainer_ab(
    cases: str,
    variants: dict[str, Callable[[], None]],
    restore: Callable[[], None],
    iters: int,
    rounds: int = 2,
) -> list[dict]:
    """`cases`: ','-separated preset:batch:remat. Returns one row per case: per variant the
    median step times of each round, the temporaries of the compiled step and the last loss."""
    results = []
    for case in cases.split(","):
        preset, b, remat = case.split(":")
        config = load_config(preset, int(b))
        config.model.remat_policy = remat
        mesh = sharding.mesh_from_config(config.mesh)
        mcfg = dit_train.model_config(config)
        batch = random_batch(mcfg, int(b))
        bits = [jax.random.key_data(jax.random.key(i)) for i in range(2)]
        row, steps = dict(case=case), {}
        try:
            for name, patch in variants.items():
                patch()
                ts = dit_train.build_step(config, mesh, mcfg)
                state = ts.init_state(jax.random.key(0))
                compiled = ts.jit().lower(state, batch, bits[0]).compile()
                mem = compiled.memory_analysis()
                steps[name] = (ts, compiled)
                row[name] = dict(ms=[], temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30)
                del state
        finally:
            restore()
        for _ in range(rounds):
            for name, (ts, compiled) in steps.items():
                state = ts.init_state(jax.random.key(0))
                state, t, loss = time_it(compiled, state, batch, bits, iters)
                row[name]["ms"].append(t * 1e3)
                row[name]["loss"] = loss
                print(case, name, f"{t * 1e3:.2f} ms loss {loss:.5f}", flush=True)
                del state
        print(case, row, flush=True)
        results.append(row)
        del steps
    return results


def write_results(out_dir: pathlib.Path, name: str, results: list[dict]) -> None:
    (out_dir / name).write_text(
        json.dumps(
            dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results),
            indent=1,
        )
    )
