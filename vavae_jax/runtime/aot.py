"""Ahead-of-time compile checks: will a train step fit a machine we do not have yet?

A *topology* string names the devices to compile for; `abstract_mesh_for` turns it into the
project's (`data`, `fsdp`) mesh over those devices and `compile_report` lowers and compiles a
jitted, sharded step from shapes only (`jax.ShapeDtypeStruct`s), returning the memory per device
(`compiled.memory_analysis()`) and the FLOPs (`compiled.cost_analysis()`).

  cpu:N              N local CPU devices (tests: XLA_FLAGS=--xla_force_host_platform_device_count=N)
  tpu:v5e-64         a Cloud TPU accelerator type: v5e-N / v5litepod-N / v6e-N (N chips),
                     v4-N / v5p-N (N TensorCores = 2 per chip, one JAX device per chip)
  tpu:v5e:8x8        a libtpu topology name as it is (tpu:v4:2x2x4, tpu:v6e:16x16, ...)
  gpu:N              N CUDA GPUs: the attached ones when the host has N; otherwise a deviceless
                     compile from a GPU target config (`gpu_target_config=`, written once on a
                     machine with that GPU by `gpu_target_config_text()`).

TPU targets need libtpu (`pip install libtpu`, or the `tpu` extra) but no TPU: libtpu compiles for
compile-only devices of any slice (`jax.experimental.topologies.get_topology_desc`) and refuses a
program that does not fit (reported as `fits=False`). The same holds for CUDA with the CUDA plugin
installed and a target config; without a GPU XLA cannot autotune, so Triton GEMMs are switched off
and temp memory can differ a little from a compile on the real GPU. Memory numbers are per device:
the SPMD-partitioned program that each device runs. FLOPs come from XLA's cost analysis, which
counts a loop body once: for a model scanned over its layers they are a lower bound (flagged).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vavae_jax.runtime import sharding

GiB = 1024**3

# HBM per JAX device by `device.device_kind` (compile-only devices have no memory_stats()).
# v4 and v5p run one JAX device per chip (megacore), so the chip's HBM is the device's.
TPU_HBM_BYTES = {
    "TPU v4": 32 * GiB,
    "TPU v5 lite": 16 * GiB,  # v5e
    "TPU v5": 95 * GiB,  # v5p
    "TPU v6 lite": 32 * GiB,  # v6e (Trillium)
}

# Cloud TPU families: (libtpu prefix, chips per accelerator-type unit, mesh rank, chip config).
# v4-32 counts TensorCores (16 chips); v5litepod-64 counts chips.
_TPU_FAMILIES = {
    "v4": ("v4", 2, 3, "megacore"),
    "v5p": ("v5p", 2, 3, "megachip_tccontrol"),
    "v5e": ("v5e", 1, 2, None),
    "v5litepod": ("v5e", 1, 2, None),
    "v6e": ("v6e", 1, 2, "megachip_tccontrol"),
}
# Hosts of the 2D generations hold up to 8 chips (v5litepod-8 is one VM); larger slices and all
# v4 / v5p slices have 4 chips (2x2x1) per host, libtpu's default.
_SINGLE_HOST_MAX_CHIPS = {2: 8, 3: 4}


@dataclasses.dataclass(frozen=True)
class TopologySpec:
    """A parsed topology string: which platform and, for TPUs, libtpu's name and options."""

    platform: str  # "cpu", "tpu" or "gpu"
    num_devices: int | None  # None: libtpu decides (a raw libtpu topology name)
    tpu_name: str = ""  # libtpu topology name, e.g. "v5e:8x8"
    tpu_kwargs: tuple[tuple[str, Any], ...] = ()


def _chip_grid(chips: int, rank: int) -> tuple[int, ...]:
    """Cloud TPU slice shapes: 2x2(x1) doubled one axis at a time, the last smallest axis first
    (v5e: 4 -> 2x2, 8 -> 2x4, 64 -> 8x8; v4: 16 -> 2x2x4, 64 -> 4x4x4, 128 -> 4x4x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"TPU slices have a power-of-two number of chips, got {chips}")
    if chips == 1:
        return (1,) * rank
    if chips == 2:
        return (1, 2) if rank == 2 else (1, 2, 1)
    dims = [2, 2] + [1] * (rank - 2)
    while math.prod(dims) < chips:
        smallest = min(dims)
        i = max(j for j, d in enumerate(dims) if d == smallest)
        dims[i] *= 2
    return tuple(dims)


def tpu_topology(accelerator_type: str) -> tuple[str, dict[str, Any]]:
    """A Cloud TPU accelerator type ("v5litepod-64", "v4-32") -> libtpu topology name + options."""
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", accelerator_type)
    if not m:
        raise ValueError(
            f"unknown TPU accelerator type {accelerator_type!r}: expected v4-N, v5p-N, v5e-N, "
            f"v5litepod-N or v6e-N (or a libtpu topology name such as v5e:8x8)"
        )
    family, count = m.group(1), int(m.group(2))
    prefix, per_chip, rank, chip_config = _TPU_FAMILIES[family]
    if count % per_chip:
        raise ValueError(f"{accelerator_type}: {family}-N counts TensorCores; N must be even")
    chips = count // per_chip
    grid = _chip_grid(chips, rank)
    name = f"{prefix}:{'x'.join(map(str, grid))}"
    kwargs: dict[str, Any] = {}
    if chip_config:
        kwargs["chip_config_name"] = chip_config
    if chips <= _SINGLE_HOST_MAX_CHIPS[rank]:
        kwargs["chips_per_host_bounds"] = tuple(grid) + (1,) * (3 - rank)
    return name, kwargs


def parse_topology(topology: str) -> TopologySpec:
    """Parses "cpu:8", "gpu:8", "tpu:v5e-64" or "tpu:v5e:8x8" (see the module docstring)."""
    platform, _, rest = topology.partition(":")
    if platform in ("cpu", "gpu"):
        if not rest.isdigit() or int(rest) < 1:
            raise ValueError(f"topology {topology!r}: expected {platform}:N with N >= 1")
        return TopologySpec(platform, int(rest))
    if platform == "tpu" and rest:
        if ":" in rest:  # a libtpu topology name, passed through
            return TopologySpec("tpu", None, rest)
        name, kwargs = tpu_topology(rest)
        grid = name.partition(":")[2]
        chips = math.prod(int(d) for d in grid.split("x"))
        return TopologySpec("tpu", chips, name, tuple(sorted(kwargs.items())))
    raise ValueError(
        f"topology {topology!r}: expected cpu:N, gpu:N, tpu:<accelerator type> (tpu:v5e-64, "
        f"tpu:v4-32) or tpu:<libtpu name> (tpu:v5e:8x8)"
    )


def target_devices(topology: str, *, gpu_target_config: str | None = None) -> list:
    """The devices of `topology`: real ones for cpu:N (and gpu:N on a host with N GPUs),
    compile-only ones for TPUs and for GPUs given a target config (text proto or its path)."""
    spec = parse_topology(topology)
    if spec.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < spec.num_devices:
            raise ValueError(
                f"{topology}: only {len(devices)} CPU devices; start Python with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={spec.num_devices}"
            )
        return devices[: spec.num_devices]
    from jax.experimental import topologies

    if spec.platform == "tpu":
        desc = topologies.get_topology_desc(
            topology_name=spec.tpu_name, platform="tpu", **dict(spec.tpu_kwargs)
        )
        return list(desc.devices)
    n = spec.num_devices
    if gpu_target_config is None:
        attached = [d for d in jax.devices() if d.platform == "gpu"]
        if len(attached) < n:
            raise ValueError(
                f"{topology}: this host has {len(attached)} GPUs. Compile for {n} GPUs with a "
                f"GPU target config (--gpu_target_config; write one on any machine with that GPU "
                f"with launch/compile_check.py --dump_gpu_target_config=FILE), or on a host with "
                f"fewer GPUs with --gpu_mock_processes (mock NCCL: local GPUs x processes = {n})."
            )
        return attached[:n]
    text = _read_target_config(gpu_target_config)
    desc = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{n}", target_config=text)
    return list(desc.devices)


def _read_target_config(value: str) -> str:
    if "gpu_device_info" in value:
        return value
    from vavae_jax.runtime.checkpoint import as_path

    path = as_path(value)
    if not path.exists():
        raise FileNotFoundError(f"GPU target config {value!r} not found")
    return path.read_text()


def abstract_mesh_for(
    topology: str, *, data: int = -1, fsdp: int = 1, gpu_target_config: str | None = None
) -> Mesh:
    """The project's (`data`, `fsdp`) mesh over the devices of `topology` (see `target_devices`).

    Built by `sharding.make_mesh` in the device order JAX reports, as a real run would do.
    """
    devices = target_devices(topology, gpu_target_config=gpu_target_config)
    return sharding.make_mesh(data, fsdp, devices=devices)


def gpu_target_config_text() -> str:
    """The XLA GPU target config (text proto) of this host's first GPU, for deviceless compiles
    on machines without it. Run on a machine with the GPU in question."""
    from jax._src.lib import xla_client

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        raise ValueError("no GPU on this host: write the target config on a machine with the GPU")
    return str(xla_client.get_topology_for_devices(gpus[:1]).target_config)


def device_hbm_bytes(device) -> int | None:
    """Memory of one device in bytes, or None when unknown (CPU, unlisted TPU kinds).

    TPUs: the HBM of the kind. A real GPU: the allocator's limit (by default 75% of the memory,
    XLA_PYTHON_CLIENT_MEM_FRACTION); a compile-only GPU: all of its memory (target config)."""
    if device.platform == "tpu":
        return TPU_HBM_BYTES.get(device.device_kind)
    if device.platform == "gpu":
        if getattr(device.client, "runtime_type", "") == "compile_only_runtime":
            from jax._src.lib import xla_client

            text = str(xla_client.get_topology_for_devices([device]).target_config)
            m = re.search(r"device_memory_size:\s*(\d+)", text)
            return int(m.group(1)) if m else None
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    return None


def _bytes_per_device(x: jax.ShapeDtypeStruct, s: jax.sharding.Sharding) -> int:
    return math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def _cost(compiled, lowered, num_devices: int) -> dict[str, Any]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        return {
            "flops_per_device": float(cost["flops"]),
            "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
            "flops_source": "compiled program (per device)",
        }
    # Compile-only GPU executables report no cost. Analyse the unpartitioned module with the CPU
    # backend instead: global FLOPs before optimisation, divided evenly over the devices.
    from jax._src.lib import _jax
    from jax.extend import backend as jex_backend

    module = lowered.compiler_ir("hlo").as_hlo_module()
    cost = _jax.hlo_module_cost_analysis(jex_backend.get_backend("cpu"), module)
    return {
        "flops_per_device": float(cost["flops"]) / num_devices,
        "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)) / num_devices,
        "flops_source": "unoptimised global HLO / devices (estimate)",
    }


def _args_bytes_per_device(abstract_args: tuple, in_shardings: Any) -> int:
    """Per-device bytes of the arguments from their shapes and the (prefix) input shardings."""
    if not isinstance(in_shardings, tuple | list):
        in_shardings = (in_shardings,) * len(abstract_args)

    def subtree(s, sub):
        leaves = jax.tree.leaves(sub)
        if isinstance(s, jax.sharding.Sharding):
            return sum(_bytes_per_device(x, s) for x in leaves)
        return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)

    is_sharding = lambda x: x is None or isinstance(x, jax.sharding.Sharding)
    per_arg = jax.tree.map(subtree, tuple(in_shardings), abstract_args, is_leaf=is_sharding)
    return int(sum(jax.tree.leaves(per_arg)))


def _target_device(in_shardings: Any) -> tuple[Any, int]:
    leaves = jax.tree.leaves(in_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    shardings = [s for s in leaves if isinstance(s, jax.sharding.Sharding)]
    if not shardings:
        raise ValueError("compile_report needs explicit in_shardings on the target's mesh")
    devices = shardings[0].device_set
    return min(devices, key=lambda d: d.id), len(devices)


_TPU_OOM = re.compile(
    r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)"
)


def compile_report(
    step_fn: Callable,
    abstract_args: Sequence[Any],
    in_shardings: Any,
    out_shardings: Any,
    donate_argnums: int | Sequence[int] = (),
    *,
    hbm_bytes: int | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Lowers and compiles `jax.jit(step_fn, in_shardings, out_shardings, donate_argnums)` for
    `abstract_args` (pytrees of `jax.ShapeDtypeStruct`) and reports per-device memory and FLOPs.

    `in_shardings` decide the target devices (build them on `abstract_mesh_for(...)`). Memory:
    `total_bytes` = arguments + outputs - aliased (donated) + temporaries + generated code, XLA's
    own static estimate of the peak; `fits` compares it with the device memory (`hbm_bytes`,
    default from the device kind; None where unknown). The TPU compiler refuses a program that
    does not fit its HBM: the report then has `fits=False`, the compiler's `error` and no
    memory breakdown (`total_bytes` None).

    `compiler_options` (XLA debug options) go to this compile only, e.g. CPU's LLVM at -O0
    (`{"xla_backend_optimization_level": 0}`): a faster compile of slower code, with the same
    buffer sizes and FLOP counts (XLA's, from before the code generation).
    """
    abstract_args = tuple(abstract_args)
    device, num_devices = _target_device(in_shardings)
    hbm = device_hbm_bytes(device) if hbm_bytes is None else hbm_bytes
    report: dict[str, Any] = {
        "platform": device.platform,
        "device_kind": device.device_kind,
        "num_devices": num_devices,
        "compile_only": getattr(device.client, "runtime_type", "") == "compile_only_runtime",
        # From the shapes and shardings alone; XLA's figure below is equal on CPU and GPU and a
        # little larger on TPU, which pads small arrays to its tiles.
        "argument_bytes_from_shardings": _args_bytes_per_device(abstract_args, in_shardings),
        "hbm_bytes": hbm,
    }
    jitted = jax.jit(
        step_fn,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        donate_argnums=donate_argnums,
    )
    t0 = time.perf_counter()
    lowered = jitted.lower(*abstract_args)
    t1 = time.perf_counter()
    report["lower_seconds"] = round(t1 - t0, 3)
    options = dict(compiler_options or {})
    if device.platform == "gpu" and report["compile_only"]:
        # Without a GPU to autotune on, Triton GEMM fusions can find no tiling and the compile
        # fails ("Couldn't find output tile sizes"); cuBLAS GEMMs compile. Memory is close to
        # that of the real program, which may still pick Triton GEMMs where they autotune better.
        options["xla_gpu_enable_triton_gemm"] = False
    if options:
        report["compiler_options"] = dict(options)
    try:
        compiled = lowered.compile(compiler_options=options or None)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.update(fits=False, error=str(e).strip(), total_bytes=None)
        if m := _TPU_OOM.search(str(e)):
            report["temp_bytes"] = int(float(m.group(1)) * GiB)
            report["hbm_available_bytes"] = int(float(m.group(2)) * GiB)
        report["compile_seconds"] = round(time.perf_counter() - t1, 3)
        return report
    report["compile_seconds"] = round(time.perf_counter() - t1, 3)

    mem = compiled.memory_analysis()
    if mem is None:
        raise ValueError(f"{device.platform}: the compiler reports no memory analysis")
    report.update(
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
    )
    report["total_bytes"] = (
        report["argument_bytes"]
        + report["output_bytes"]
        - report["alias_bytes"]
        + report["temp_bytes"]
        + report["generated_code_bytes"]
    )
    report["fits"] = None if hbm is None else report["total_bytes"] <= hbm
    report.update(_cost(compiled, lowered, num_devices))
    # XLA's cost analysis counts a while loop's body once, whatever its trip count: a model
    # scanned over its layers (nnx.scan) is undercounted by about the number of layers.
    report["flops_loops_counted_once"] = bool(re.search(r"\bwhile\(", compiled.as_text() or ""))
    return report


def check_config(
    config,
    topology: str,
    build_abstract_step: Callable,
    *,
    global_batch: int | None = None,
    gpu_target_config: str | None = None,
    hbm_bytes: int | None = None,
) -> dict[str, Any]:
    """A trainer's config on `topology` (launch/compile_check.py): builds the mesh of
    config.mesh, asks the trainer's `build_abstract_step(config, mesh)` hook for the step and
    returns `compile_report`'s report with the topology, mesh, batch and sharding added.
    `config` is left alone (`global_batch` overrides config.global_batch_size in a copy)."""
    config = copy.deepcopy(config)
    if global_batch is not None:
        with config.unlocked():
            config.global_batch_size = global_batch
    mesh = abstract_mesh_for(
        topology, data=config.mesh.data, fsdp=config.mesh.fsdp, gpu_target_config=gpu_target_config
    )
    if config.global_batch_size % mesh.devices.size:
        raise ValueError(
            f"global batch {config.global_batch_size} is not divisible by the {mesh.devices.size} "
            f"devices of {topology}: choose a multiple of {mesh.devices.size}"
        )
    # No mesh context here: the hook receives the mesh and gives every sharding explicitly.
    fn, args, in_sh, out_sh, donate = build_abstract_step(config, mesh)
    report = compile_report(fn, args, in_sh, out_sh, donate, hbm_bytes=hbm_bytes)
    report.update(
        topology=topology,
        mesh={k: int(v) for k, v in mesh.shape.items()},
        global_batch_size=int(config.global_batch_size),
        sharding=config.get("sharding"),
    )
    return report


def format_report(report: dict[str, Any]) -> str:
    """A few readable lines for the terminal."""

    def gib(b):
        for unit, size in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
            if b >= size:
                return f"{b / size:8.2f} {unit}"
        return f"{b:8d} B  "

    head = f"target: {report['num_devices']} x {report['device_kind']} ({report['platform']})"
    if report["total_bytes"] is None:
        lines = [head, "  DOES NOT FIT: the compiler refused the program", f"  {report['error']}"]
        lines.append(
            f"  arguments      {gib(report['argument_bytes_from_shardings'])}  (from shardings)"
        )
        return "\n".join(lines)
    lines = [
        head,
        f"  arguments      {gib(report['argument_bytes'])}",
        f"  outputs        {gib(report['output_bytes'])}",
        f"  aliased        {gib(report['alias_bytes'])}  (donated inputs reused as outputs)",
        f"  temporaries    {gib(report['temp_bytes'])}",
        f"  generated code {gib(report['generated_code_bytes'])}",
        f"  total          {gib(report['total_bytes'])}  per device",
    ]
    hbm = report.get("hbm_bytes")
    if hbm:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        lines.append(
            f"  device memory  {gib(hbm)}  -> {verdict} "
            f"({100 * report['total_bytes'] / hbm:.1f}% used)"
        )
    else:
        lines.append("  device memory  unknown (pass --hbm_gib)")
    if report["platform"] == "gpu" and report.get("compile_only"):
        lines.append(
            "  note: a run gets 75% of it unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise"
        )
    lines.append(
        f"  FLOPs          {report['flops_per_device'] / 1e9:8.2f} GFLOP per device per step "
        f"[{report['flops_source']}]"
    )
    if report.get("flops_loops_counted_once"):
        lines.append(
            "  note: the program loops (e.g. a scan over layers) and XLA counts each loop body"
            " once: FLOPs are a lower bound"
        )
    lines.append(
        f"  lowered in {report['lower_seconds']:.1f} s, compiled in {report['compile_seconds']:.1f} s"
    )
    return "\n".join(lines)
