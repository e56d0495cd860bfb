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

import functools
import os
import pathlib
import sys

from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch import ab_common  # noqa: E402
from lightningdit_jax import model as model_lib  # noqa: E402

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
    results = ab_common.trainer_ab(
        os.environ.get("CASES", "XL/1:64:none,B/1:256:none,XL/1:128:dots_no_batch"),
        {name: functools.partial(use, name) for name in ("nnx_linear", "dense")},
        restore=functools.partial(use, "default"),
        iters=int(os.environ.get("ITERS", "20")),
    )
    ab_common.write_results(pathlib.Path(os.environ.get("OUT", "/tmp")), "ab_dense.json", results)


if __name__ == "__main__":
    main()
