"""Trains on a Cloud TPU VM or pod slice with gcloud: create or reuse, set up, train, watch, delete.

  python launch/tpu/run_tpu.py up --name=ldit --zone=us-west4-a --accelerator_type=v5litepod-64 \
      --spot --config=configs/lightningdit_xl_vavae_f16d32.py:XL/1 \
      --workdir=gs://my-bucket/runs/ldit-xl --override=--config.global_batch_size=1024 \
      --override=--config.mesh.fsdp=8 \
      --override=--config.data.data_dir=gs://my-bucket/latents/imagenet256
  python launch/tpu/run_tpu.py logs --name=ldit --zone=us-west4-a
  python launch/tpu/run_tpu.py delete --name=ldit --zone=us-west4-a

Every worker of the slice runs the same `launch/train.py` (`gcloud ... ssh --worker=all`), which
starts `jax.distributed` (auto-detected on TPU VMs) and reads data and writes the workdir on GCS.
`--dry_run` prints the commands instead of running them. See launch/tpu/README.md.

The gcloud command lines, the remote scripts and the runner are vavae_jax/runtime/tpu.py.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from vavae_jax.runtime.tpu import (
    CHECK_SCRIPT,
    Runner,
    Tpu,
    bash,
    copy_code,
    create_or_reuse,
    delete_command,
    logs_script,
    setup_script,
    ssh_command,
    stop_script,
    train_script,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the working tree `setup` copies


def _tpu_from_args(a: argparse.Namespace) -> Tpu:
    return Tpu(
        name=a.name,
        zone=a.zone,
        accelerator_type=a.accelerator_type,
        project=a.project,
        runtime_version=a.runtime_version,
        spot=a.spot,
        preemptible=a.preemptible,
        queued=a.queued,
        valid_until_duration=a.valid_until_duration,
        reserved=a.reserved,
        network=a.network,
        subnetwork=a.subnetwork,
        service_account=a.service_account,
        internal_ip=a.internal_ip,
    )


def _pairs(items: Sequence[str], sep: str, what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        # BUCKET:DIR splits at the last colon (gs://b:/mnt/b), KEY=VALUE at the first.
        key, found, value = item.rpartition(sep) if sep == ":" else item.partition(sep)
        if not found or not key or not value:
            raise SystemExit(f"--{what} {item!r}: expected A{sep}B")
        out.append((key, value))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "action",
        choices=[
            "create",
            "setup",
            "train",
            "up",
            "check",
            "logs",
            "stop",
            "ssh",
            "status",
            "delete",
        ],
    )
    g = p.add_argument_group("the TPU")
    g.add_argument("--name", required=True)
    g.add_argument("--zone", required=True)
    g.add_argument("--project", default=None)
    g.add_argument(
        "--accelerator_type",
        default="v5litepod-8",
        help="v5litepod-64, v4-32, v5p-128, v6e-256, ...",
    )
    g.add_argument("--runtime_version", default=None, help="default: by TPU generation")
    g.add_argument("--spot", action="store_true", help="Spot VMs (preemptible, cheaper)")
    g.add_argument("--preemptible", action="store_true", help="legacy preemptible VMs")
    g.add_argument("--queued", action="store_true", help="create through a queued resource")
    g.add_argument("--valid_until_duration", default=None, help="queued: e.g. 6h")
    g.add_argument("--reserved", action="store_true")
    g.add_argument("--network", default=None)
    g.add_argument("--subnetwork", default=None)
    g.add_argument("--service_account", default=None)
    g.add_argument("--internal_ip", action="store_true")
    s = p.add_argument_group("setup")
    s.add_argument("--git_url", default=None, help="clone this instead of copying the local tree")
    s.add_argument("--git_ref", default="main")
    s.add_argument("--python", default="3.11")
    s.add_argument("--extra", default="tpu", help="the setup.py extra to install")
    s.add_argument(
        "--mount",
        action="append",
        default=[],
        metavar="BUCKET:DIR",
        help="mount a bucket with gcsfuse on every worker (repeatable)",
    )
    t = p.add_argument_group("training")
    t.add_argument("--config", default=None, help="config file[:variants], as for train.py")
    t.add_argument("--workdir", default=None, help="gs://bucket/path")
    t.add_argument(
        "--override",
        action="append",
        default=[],
        help="one more train.py argument, e.g. --override=--config.seed=1 (repeatable)",
    )
    t.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--foreground", action="store_true", help="stream output, stop on disconnect")
    o = p.add_argument_group("other")
    o.add_argument("--worker", default="0", help="logs/ssh: a worker index or all")
    o.add_argument("--lines", type=int, default=100)
    o.add_argument("--no_follow", action="store_true")
    o.add_argument("--command", default=None, help="ssh: the command to run")
    o.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: Sequence[str]) -> None:
    """`argv` after `--` goes to train.py as it is (like repeated --override)."""
    argv = list(argv)
    rest = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    a = build_parser().parse_args(argv)
    a.override = [*a.override, *rest]
    tpu = _tpu_from_args(a)
    runner = Runner(a.dry_run)
    act = a.action
    if act in ("train", "up") and not (a.config and a.workdir):
        raise SystemExit(f"{act}: --config and --workdir are required")
    if act in ("create", "up"):
        create_or_reuse(runner, tpu)
    if act in ("setup", "up"):
        if not a.git_url:
            copy_code(runner, tpu, ROOT)
        script = setup_script(
            git_url=a.git_url,
            git_ref=a.git_ref,
            extra=a.extra,
            python=a.python,
            mounts=_pairs(a.mount, ":", "mount"),
        )
        runner.run(ssh_command(tpu, bash(script)), script)
    if act in ("train", "up"):
        script = train_script(
            a.config, a.workdir, a.override, _pairs(a.env, "=", "env"), detach=not a.foreground
        )
        runner.run(ssh_command(tpu, bash(script)), script)
    if act == "check":
        runner.run(ssh_command(tpu, CHECK_SCRIPT))
    if act == "logs":
        runner.run(ssh_command(tpu, logs_script(a.lines, not a.no_follow), worker=a.worker))
    if act == "stop":
        runner.run(ssh_command(tpu, bash(stop_script())), stop_script())
    if act == "ssh":
        if not a.command:
            raise SystemExit("ssh: --command is required")
        runner.run(ssh_command(tpu, a.command, worker=a.worker))
    if act == "status":
        state = runner.state(tpu)
        print(state if state is not None else ("(dry run)" if a.dry_run else "not found"))
    if act == "delete":
        runner.run(delete_command(tpu))


if __name__ == "__main__":
    main(sys.argv[1:])
