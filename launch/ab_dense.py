"""A/B of BENCHMARKS.md run 29: the trainer's LightningDiT step with the linear layers' products
through `model.dense` (the custom VJP whose kernel gradient is written [in, out]) against plain
`nnx.Linear`, in one process on one device, variants alternating. The script forces `dense` on
every linear layer whatever the remat policy; the model itself uses it only in the blocks and
only without remat, where it measured faster.

    CASES="XL/1:64:none,B/1:256:none,XL/1:128:dots_no_batch" ITERS=20 python3 launch/ab_dense.py

Each round builds a fresh state per variant (two XL/1 states at batch 128 do not fit beside the
step on an 80 GB GPU), so only the compiled programs are kept across rounds. Writes
$OUT/ab_dense.json.
"""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch.ab_sliced_state import load_config, time_it  # noqa: E402
from lightningdit_jax import model as model_lib  # noqa: E402
from lightningdit_jax import train as dit_train  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402

DENSE_CALL = model_lib.Dense.__call__


def _forced_dense_call(self, inputs, out_sharding=None):  # every layer with a bias, remat or not
    if self.bias is None:
        return nnx.Linear.__call__(self, inputs, out_sharding)
    x, kernel, bias = self.promote_dtype(
        (inputs, self.kernel[...], self.bias[...]), dtype=self.dtype
    )
    return model_lib.dense(x, kernel, bias)


CALLS = {"dense": _forced_dense_call, "nnx_linear": nnx.Linear.__call__, "default": DENSE_CALL}


def use(variant: str) -> None:
    model_lib.Dense.__call__ = CALLS[variant]


def main():
    out = pathlib.Path(os.environ.get("OUT", "/tmp"))
    iters = int(os.environ.get("ITERS", "20"))
    cases = os.environ.get("CASES", "XL/1:64:none,B/1:256:none,XL/1:128:dots_no_batch")
    results = []
    for case in cases.split(","):
        preset, b, remat = case.split(":")
        config = load_config(preset, int(b))
        config.model.remat_policy = remat
        mesh = sharding.mesh_from_config(config.mesh)
        mcfg = dit_train.model_config(config)
        shape = (int(b), mcfg.input_size, mcfg.input_size, mcfg.in_channels)
        batch = dict(
            latent=jax.random.normal(jax.random.key(1), shape, jnp.float32),
            label=jax.random.randint(jax.random.key(2), (int(b),), 0, mcfg.num_classes),
        )
        bits = [jax.random.key_data(jax.random.key(i)) for i in range(2)]
        row = dict(case=case)
        steps = {}
        for variant in ("nnx_linear", "dense"):
            use(variant)
            ts = dit_train.build_step(config, mesh, mcfg)
            state = ts.init_state(jax.random.key(0))
            compiled = ts.jit().lower(state, batch, bits[0]).compile()
            mem = compiled.memory_analysis()
            steps[variant] = (ts, compiled)
            row[variant] = dict(ms=[], temp_gib=getattr(mem, "temp_size_in_bytes", 0) / 2**30)
            del state
        use("default")
        for _ in range(2):
            for variant, (ts, compiled) in steps.items():
                state = ts.init_state(jax.random.key(0))
                state, t, loss = time_it(compiled, state, batch, bits, iters)
                row[variant]["ms"].append(t * 1e3)
                row[variant]["loss"] = loss
                print(case, variant, f"{t * 1e3:.2f} ms loss {loss:.5f}", flush=True)
                del state
        print(case, row, flush=True)
        results.append(row)
        del steps
    (out / "ab_dense.json").write_text(
        json.dumps(
            dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results),
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
