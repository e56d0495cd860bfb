"""Multi-host start-up: `jax.distributed.initialize` on TPU VMs, SLURM, or explicit flags."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


# Overlap of the gradient all-reduce with the backward pass on GPUs (BENCHMARKS.md: XL/1 on
# 2 x H200 scales 90.9% with these, 89.6% without). GPU-only options; other backends ignore them.
GPU_XLA_FLAGS = {
    "--xla_gpu_enable_latency_hiding_scheduler": "true",
    "--xla_gpu_all_reduce_combine_threshold_bytes": str(128 * 1024 * 1024),
}


def default_xla_flags(current: str) -> str:
    """`current` XLA_FLAGS plus GPU_XLA_FLAGS that it does not set already (launch/train.py sets
    XLA_FLAGS to this before JAX starts its backend, which reads them once)."""
    extra = [f"{k}={v}" for k, v in GPU_XLA_FLAGS.items() if k not in current]
    return " ".join([current.strip(), *extra]).strip()


def detect_cluster() -> str | None:
    """Names the multi-process environment we run in, or None for a single process."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if len([h for h in hosts.split(",") if h]) > 1:
        return "tpu"
    # GCE TPU VMs usually leave TPU_WORKER_HOSTNAMES unset (JAX asks the metadata server), but
    # every TPU VM has accelerator device files; initialize() is also right on a 1-host slice.
    if (
        os.environ.get("TPU_ACCELERATOR_TYPE")
        or os.path.exists("/dev/accel0")
        or (os.path.isdir("/dev/vfio") and any(n.isdigit() for n in os.listdir("/dev/vfio")))
    ):
        return "tpu-vm"
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return "slurm"
    return None


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts JAX's distributed runtime. Errors propagate: a half-started pod must not train.

    mode: "auto" (start if `detect_cluster` finds a multi-process environment or explicit
    coordinates are given), "on" (always), "off" (never).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"--distributed={mode!r}: expected auto, on or off")
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "--coordinator_address needs --num_processes and --process_id as well "
            f"(got num_processes={num_processes}, process_id={process_id})"
        )
    cluster = detect_cluster()
    if mode == "off" or (mode == "auto" and not explicit and cluster is None):
        return
    kwargs = {}
    if explicit:
        kwargs = dict(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    log.info(
        "jax.distributed.initialize(%s) [cluster: %s]",
        kwargs or "auto-detect",
        cluster or "explicit",
    )
    enable_cpu_collectives()
    jax.distributed.initialize(**kwargs)


def enable_cpu_collectives() -> None:
    """Cross-process collectives on CPU need an implementation chosen before the CPU backend
    starts; without one, a multi-process CPU run fails at its first cross-process computation.
    Picks gloo (TCP, set up through the distributed client; JAX 0.10's default, none in older
    versions) unless one is already chosen, e.g. mpi by JAX_CPU_COLLECTIVES_IMPLEMENTATION.
    Harmless on GPU and TPU."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def describe() -> str:
    return (
        f"process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices "
        f"({jax.devices()[0].platform}: {jax.devices()[0].device_kind})"
    )
