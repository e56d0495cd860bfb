r"""Compiles a config's real train step for a target machine from shapes only: memory per device.

  python launch/compile_check.py --config=configs/lightningdit_xl_vavae_f16d32.py:XL/1 \
      --topology=tpu:v5e-64 --global_batch=1024 --config.mesh.fsdp=8
  python launch/compile_check.py --config=configs/vavae_f16d32.py --topology=cpu:8
  python launch/compile_check.py --config=configs/vavae_f16d32.py:small --topology=cpu:8 \
      --config.sharding=fsdp --config.mesh.fsdp=4

Nothing is allocated and no accelerator is needed for the target: the trainer's
`build_abstract_step(config, mesh)` hook gives the jitted step and `jax.ShapeDtypeStruct`
arguments, `vavae_jax.runtime.aot` compiles them for the target's devices and reports XLA's
memory analysis (arguments, outputs, donated aliases, temporaries, code) against the device memory.

Topologies (see vavae_jax/runtime/aot.py):
  cpu:N        N fake CPU devices.
  tpu:<type>   v5e-64, v5litepod-64, v4-32, v5p-128, v6e-256, or a libtpu name (v5e:8x8). Needs
               libtpu in this environment (`pip install libtpu`), not a TPU.
  gpu:N        on a host with N GPUs: those. Elsewhere, with --gpu_target_config=FILE (the CUDA
               plugin must be installed, no GPU needed): a deviceless compile for N of that GPU;
               write FILE once on any machine with one such GPU: --dump_gpu_target_config=FILE.
               Or on a GPU host with fewer GPUs: --gpu_mock_processes=K mocks K processes of its
               local GPUs (NCCL mocked), so 1 GPU x K=8 compiles the 8-GPU program.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import pathlib

from absl import app, flags
from ml_collections import config_flags

from vavae_jax.runtime import cli

TRAINER_MODULES = {"vavae": "vavae_jax.train", "lightningdit": "lightningdit_jax.train"}


def load_hook(trainer: str | None):
    """`build_abstract_step` of the trainer named by config.trainer, imported only now."""
    if trainer not in TRAINER_MODULES:
        raise ValueError(f"config.trainer={trainer!r}: expected one of {sorted(TRAINER_MODULES)}")
    module = importlib.import_module(TRAINER_MODULES[trainer])
    hook = getattr(module, "build_abstract_step", None)
    if hook is None:
        raise ValueError(
            f"{TRAINER_MODULES[trainer]} has no build_abstract_step(config, mesh) -> "
            f"(fn, abstract_args, in_shardings, out_shardings, donate_argnums)"
        )
    return hook


def configure_platform(
    topology: str, *, gpu_target_config: str | None = None, gpu_mock_processes: int = 0
) -> None:
    """Chooses JAX's backend before it starts: compile-only targets need only the CPU client."""
    import jax

    platform, _, rest = topology.partition(":")
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(rest))
    elif platform == "tpu" or (platform == "gpu" and gpu_target_config):
        jax.config.update("jax_platforms", "cpu")
    elif platform == "gpu" and gpu_mock_processes:
        # Sharded autotuning would wait for the mocked processes (MaxText's AOT does the same).
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_gpu_shard_autotuning=false"
        ).strip()
        jax.config.update("mock_num_gpu_processes", gpu_mock_processes)


def define_flags() -> None:
    """Flags of the script (defined only when it runs as one)."""
    config_flags.DEFINE_config_file("config", None, "Config file[:variants].", lock_config=True)
    flags.DEFINE_string("topology", None, "Target: cpu:N, gpu:N, tpu:v5e-64, tpu:v5e:8x8 ...")
    flags.DEFINE_integer("global_batch", None, "Overrides config.global_batch_size.")
    flags.DEFINE_float("hbm_gib", None, "Device memory in GiB (default: known per device kind).")
    flags.DEFINE_string(
        "gpu_target_config", None, "GPU target config (text proto) for a deviceless gpu:N compile."
    )
    flags.DEFINE_integer(
        "gpu_mock_processes", 0, "Mock this many processes of the local GPUs (mock NCCL)."
    )
    flags.DEFINE_string(
        "dump_gpu_target_config", None, "Write this host's GPU target config to FILE and exit."
    )
    flags.DEFINE_string("json_out", None, "Also write the report as JSON here.")
    flags.mark_flag_as_required("config")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from vavae_jax.runtime import aot
    from vavae_jax.runtime.logging import setup_python_logging

    setup_python_logging()
    f = flags.FLAGS
    if f.dump_gpu_target_config:
        pathlib.Path(f.dump_gpu_target_config).write_text(aot.gpu_target_config_text())
        logging.info("wrote the GPU target config to %s", f.dump_gpu_target_config)
        return
    if not f.topology:
        raise app.UsageError("--topology is required (cpu:N, gpu:N, tpu:v5e-64, ...)")
    configure_platform(
        f.topology, gpu_target_config=f.gpu_target_config, gpu_mock_processes=f.gpu_mock_processes
    )
    config = f.config
    hook = load_hook(config.get("trainer"))
    hbm = None if f.hbm_gib is None else int(f.hbm_gib * aot.GiB)
    report = aot.check_config(
        config,
        f.topology,
        hook,
        global_batch=f.global_batch,
        gpu_target_config=f.gpu_target_config,
        hbm_bytes=hbm,
    )
    config_arg = config_flags.get_config_filename(f["config"])
    print(
        f"{config_arg} on {f.topology}: mesh {report['mesh']}, global batch "
        f"{report['global_batch_size']}, sharding {report['sharding']}"
    )
    print(aot.format_report(report))
    if f.json_out:
        pathlib.Path(f.json_out).write_text(json.dumps(report, indent=2, sort_keys=True))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
