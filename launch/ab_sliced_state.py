"""A/B of BENCHMARKS.md run 28 (rejected): the trainer's step with the block parameters, Adam
moments and EMA held as per-layer slices, so that no stacked gradient is ever joined, against
the trainer's stacked layout. `step` below repeats `train.make_train_step` line for line but for
the parameters' layout (kept apart so the trainer has no hook for a rejected idea). Both steps
start from one state; the script checks that one step gives equal parameters, then times them
alternately on the same device.

    CASES="XL/1:64,B/1:256" ITERS=20 python3 launch/ab_sliced_state.py   # writes $OUT/exp_sliced.json
"""

import json
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from launch.ab_common import load_config, time_it  # noqa: E402
from lightningdit_jax import train as dit_train  # noqa: E402
from lightningdit_jax import transport as transport_lib  # noqa: E402
from vavae_jax.runtime import sharding  # noqa: E402


def sliced_step(ts, config, depth):
    tx = dit_train.make_optimizer(config.optim)
    transport = dit_train.make_transport(config)
    graphdef = ts.graphdef
    _, treedef = jax.tree.flatten(ts.abstract_state["params"])
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(ts.abstract_state["params"])[0]]
    is_block = [str(getattr(p[0], "key", p[0])) == "blocks" for p in paths]

    def slice_tree(params):
        leaves = jax.tree.leaves(params)
        return [
            tuple(x[i] for i in range(depth)) if blk else x
            for x, blk in zip(leaves, is_block, strict=True)
        ]

    def stack_tree(sl):
        leaves = [jnp.stack(x) if blk else x for x, blk in zip(sl, is_block, strict=True)]
        return jax.tree.unflatten(treedef, leaves)

    ema_decay = config.ema.decay

    def step(state, batch, rng_bits):
        rng = jax.random.wrap_key_data(rng_bits)

        def loss_fn(sl):
            model = nnx.merge(graphdef, stack_tree(sl), state["rest"])
            return transport_lib.training_loss(
                model, batch["latent"], batch["label"], rng, transport=transport, train=True
            )

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: e * ema_decay + p * (1 - ema_decay), state["ema"], params)
        metrics = {f"train/{k}": v for k, v in terms.items()}
        metrics["train/grad_norm"] = optax.tree.norm(grads)
        metrics["train/param_norm"] = optax.tree.norm(params)
        return dict(state, params=params, opt=opt, ema=ema, step=state["step"] + 1), metrics

    def convert(state):
        p = slice_tree(state["params"])
        return dict(
            params=p,
            rest=state["rest"],
            opt=tx.init(p),
            ema=slice_tree(state["ema"]),
            step=state["step"],
        )

    return step, convert, stack_tree


def main():
    out = pathlib.Path(os.environ.get("OUT", "/tmp"))
    iters = int(os.environ.get("ITERS", "20"))
    results = []
    cases = os.environ.get("CASES", "XL/1:64,B/1:256").split(",")
    for preset, b in ((c.split(":")[0], int(c.split(":")[1])) for c in cases):
        config = load_config(preset, b)
        mesh = sharding.mesh_from_config(config.mesh)
        mcfg = dit_train.model_config(config)
        ts = dit_train.build_step(config, mesh, mcfg)
        shape = (b, mcfg.input_size, mcfg.input_size, mcfg.in_channels)
        batch = dict(
            latent=jax.random.normal(jax.random.key(1), shape, jnp.float32),
            label=jax.random.randint(jax.random.key(2), (b,), 0, mcfg.num_classes),
        )
        bits = [jax.random.key_data(jax.random.key(i)) for i in range(2)]
        step, convert, stack_tree = sliced_step(ts, config, mcfg.depth)

        base_state = ts.init_state(jax.random.key(0))
        # Equality check of one step from the same state before timing.
        sl_state = jax.jit(convert)(base_state)
        base_c = ts.jit().lower(base_state, batch, bits[0]).compile()
        sl_c = jax.jit(step, donate_argnums=(0,)).lower(sl_state, batch, bits[0]).compile()
        for name, c in (("base", base_c), ("sliced", sl_c)):
            text = c.as_text()
            print(
                preset,
                name,
                "concatenates",
                text.count(" concatenate("),
                "fusion calls",
                text.count("= fusion(") + text.count(" fusion("),
                flush=True,
            )
        s1, m1 = sl_c(sl_state, batch, bits[0])
        s0, m0 = base_c(jax.tree.map(jnp.copy, base_state), batch, bits[0])
        d = jax.tree.map(
            lambda a, b: float(jnp.max(jnp.abs(a - b))),
            jax.jit(stack_tree)(s1["params"]),
            s0["params"],
        )
        maxdiff = max(jax.tree.leaves(d))
        print(
            preset,
            "loss",
            float(m0["train/loss"]),
            float(m1["train/loss"]),
            "param maxdiff",
            maxdiff,
            flush=True,
        )
        row = dict(preset=preset, batch=b, param_maxdiff=maxdiff, base_ms=[], sliced_ms=[])
        for _ in range(2):
            s0, t0, _ = time_it(base_c, s0, batch, bits, iters)
            s1, t1, _ = time_it(sl_c, s1, batch, bits, iters)
            row["base_ms"].append(t0 * 1e3)
            row["sliced_ms"].append(t1 * 1e3)
            print(preset, f"base {t0 * 1e3:.2f} ms  sliced {t1 * 1e3:.2f} ms", flush=True)
        results.append(row)
        del s0, s1, base_state, sl_state, base_c, sl_c
    (out / "exp_sliced.json").write_text(
        json.dumps(
            dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, results=results),
            indent=1,
        )
    )
    print(json.dumps(results))


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
