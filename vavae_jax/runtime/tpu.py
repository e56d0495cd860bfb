"""Cloud TPU VMs and pod slices through gcloud: the command lines, the remote scripts, and a
runner that runs or prints them (launch/tpu/run_tpu.py is the command line).

The gcloud command lines are built by pure functions (lists of arguments; the remote command is
one argument whose shell words are quoted with `shlex.quote`), tested in tests/test_tpu_launch.py.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import shlex
import subprocess
import time
from collections.abc import Sequence

# Software images for JAX by TPU generation (Cloud TPU "TPU software versions").
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}

# On the workers (relative to the login user's home directory).
REMOTE_DIR = "vavae-lightningdit-jax"
REMOTE_VENV = "vavae-venv"
REMOTE_LOG = "vavae-train.log"
REMOTE_PID = "vavae-train.pid"
REMOTE_ARCHIVE = "vavae-src.tar.gz"
ARCHIVE_EXCLUDES = (".git", ".venv", "runs", "*.egg-info", "__pycache__", ".pytest_cache")


@dataclasses.dataclass(frozen=True)
class Tpu:
    """One TPU VM or pod slice, optionally obtained through a queued resource."""

    name: str
    zone: str
    accelerator_type: str = "v5litepod-8"
    project: str | None = None
    runtime_version: str | None = None  # default: by generation (RUNTIME_VERSIONS)
    spot: bool = False
    preemptible: bool = False
    queued: bool = False  # create through `queued-resources create` (waits for capacity)
    valid_until_duration: str | None = None  # queued only: give up after e.g. "6h"
    reserved: bool = False
    network: str | None = None
    subnetwork: str | None = None
    service_account: str | None = None
    internal_ip: bool = False  # ssh/scp over internal IPs (from a VM in the same network)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(
                f"TPU name {self.name!r}: use lowercase letters, digits and hyphens, starting "
                f"with a letter"
            )
        if not self.zone:
            raise ValueError("--zone is required (e.g. us-west4-a for v5e, us-central2-b for v4)")
        if self.spot and self.preemptible:
            raise ValueError("--spot and --preemptible exclude each other (spot is the newer one)")
        if self.valid_until_duration and not self.queued:
            raise ValueError("--valid_until_duration needs --queued")

    @property
    def version(self) -> str:
        if self.runtime_version:
            return self.runtime_version
        family = self.accelerator_type.split("-")[0]
        if family not in RUNTIME_VERSIONS:
            raise ValueError(
                f"no default runtime version for {self.accelerator_type!r}; pass "
                f"--runtime_version (see `gcloud compute tpus tpu-vm versions list`)"
            )
        return RUNTIME_VERSIONS[family]

    @property
    def queued_resource(self) -> str:
        return f"{self.name}-qr"


# ----------------------------------------------------------------------------------------------
# gcloud command lines (pure)
# ----------------------------------------------------------------------------------------------
def _gcloud(tpu: Tpu, *words: str) -> list[str]:
    argv = ["gcloud", "compute", "tpus", *words, f"--zone={tpu.zone}"]
    if tpu.project:
        argv.append(f"--project={tpu.project}")
    return argv


def create_command(tpu: Tpu) -> list[str]:
    """`tpu-vm create`, or `queued-resources create` with the node id `tpu.name`."""
    if tpu.queued:
        argv = _gcloud(tpu, "queued-resources", "create", tpu.queued_resource)
        argv += [f"--node-id={tpu.name}", f"--runtime-version={tpu.version}"]
    else:
        argv = _gcloud(tpu, "tpu-vm", "create", tpu.name)
        argv += [f"--version={tpu.version}"]
    argv.append(f"--accelerator-type={tpu.accelerator_type}")
    if tpu.spot:
        argv.append("--spot")
    if tpu.preemptible:
        argv.append("--preemptible")
    if tpu.reserved:
        argv.append("--reserved")
    if tpu.valid_until_duration:
        argv.append(f"--valid-until-duration={tpu.valid_until_duration}")
    for flag, value in (
        ("network", tpu.network),
        ("subnetwork", tpu.subnetwork),
        ("service-account", tpu.service_account),
    ):
        if value:
            argv.append(f"--{flag}={value}")
    return argv


def describe_command(tpu: Tpu) -> list[str]:
    """Prints the state: READY for a VM; ACTIVE for a queued resource once its VM exists."""
    if tpu.queued:
        return _gcloud(
            tpu, "queued-resources", "describe", tpu.queued_resource, "--format=value(state.state)"
        )
    return _gcloud(tpu, "tpu-vm", "describe", tpu.name, "--format=value(state)")


def delete_command(tpu: Tpu) -> list[str]:
    """Deletes the VM (with a queued resource: the resource and, by --force, its VM)."""
    if tpu.queued:
        return _gcloud(tpu, "queued-resources", "delete", tpu.queued_resource, "--force", "--quiet")
    return _gcloud(tpu, "tpu-vm", "delete", tpu.name, "--quiet")


def ssh_command(tpu: Tpu, remote_command: str, worker: str = "all") -> list[str]:
    """Runs `remote_command` (one shell command line) on `worker` ("all" or an index)."""
    argv = _gcloud(
        tpu, "tpu-vm", "ssh", tpu.name, f"--worker={worker}", f"--command={remote_command}"
    )
    if tpu.internal_ip:
        argv.append("--internal-ip")
    return argv


def scp_command(tpu: Tpu, local: str, remote: str, worker: str = "all") -> list[str]:
    argv = _gcloud(tpu, "tpu-vm", "scp", local, f"{tpu.name}:{remote}", f"--worker={worker}")
    if tpu.internal_ip:
        argv.append("--internal-ip")
    return argv


def archive_command(root: str, out: str, excludes: Sequence[str] = ARCHIVE_EXCLUDES) -> list[str]:
    """Packs the working tree (uncommitted changes included) for copying to the workers."""
    return ["tar", "-czf", out, *(f"--exclude={e}" for e in excludes), "-C", root, "."]


# ----------------------------------------------------------------------------------------------
# Remote scripts (pure): each becomes the one `--command` argument, run by `bash -c`
# ----------------------------------------------------------------------------------------------
def bash(script: str) -> str:
    """The remote command line that runs `script` with bash, whatever the login shell."""
    return "bash -c " + shlex.quote(script)


def _home(name: str) -> str:
    """A path under the remote home directory, double-quoted so that only $HOME expands."""
    if not re.fullmatch(r"[A-Za-z0-9._/-]+", name):
        raise ValueError(f"remote path {name!r}: only letters, digits and . _ / - are allowed")
    return f'"$HOME/{name}"'


def setup_script(
    *,
    git_url: str | None = None,
    git_ref: str = "main",
    extra: str = "tpu",
    python: str = "3.11",
    mounts: Sequence[tuple[str, str]] = (),
) -> str:
    """Gets the code (from the copied archive, or a git clone), makes a venv with uv and installs
    the project with `extra`; optionally installs gcsfuse and mounts buckets (bucket, dir)."""
    if not re.fullmatch(r"[a-z0-9_,-]+", extra):
        raise ValueError(f"--extra={extra!r}: expected extra names such as tpu or tpu,test")
    src, venv, uv = _home(REMOTE_DIR), _home(REMOTE_VENV), _home(".local/bin/uv")
    lines = ["set -euo pipefail"]
    if git_url:
        lines += [
            f"if [ ! -d {src}/.git ]; then rm -rf {src}; "
            f"git clone --quiet {shlex.quote(git_url)} {src}; fi",
            f"git -C {src} fetch --quiet origin {shlex.quote(git_ref)}",
            f"git -C {src} checkout --quiet --force FETCH_HEAD",
        ]
    else:
        lines += [
            f"rm -rf {src} && mkdir -p {src}",
            f"tar -xzf {_home(REMOTE_ARCHIVE)} -C {src}",
        ]
    lines += [
        # uv brings its own Python: the TPU images ship Python 3.10, the project needs >= 3.11.
        f"if [ ! -x {uv} ]; then curl -LsSf https://astral.sh/uv/install.sh "
        '| env UV_INSTALL_DIR="$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh; fi',
        f"{uv} venv --quiet --allow-existing --python {shlex.quote(python)} {venv}",
        f"{uv} pip install --quiet --python {_home(REMOTE_VENV + '/bin/python')} "
        f'-e "$HOME/{REMOTE_DIR}[{extra}]"',
    ]
    if mounts:
        lines += [
            "if ! command -v gcsfuse >/dev/null; then",
            '  repo="gcsfuse-$(lsb_release -c -s)"',
            '  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
            'https://packages.cloud.google.com/apt $repo main" '
            "| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null",
            "  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg "
            "| sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null",
            "  sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse",
            "fi",
        ]
        for bucket, mount_dir in mounts:
            bucket = bucket.removeprefix("gs://").rstrip("/")
            if not re.fullmatch(r"[a-z0-9][-a-z0-9_.]*", bucket) or not mount_dir.startswith("/"):
                raise ValueError(
                    f"--mount {bucket}:{mount_dir}: expected BUCKET:/absolute/dir (a whole bucket)"
                )
            b, d = shlex.quote(bucket), shlex.quote(mount_dir)
            lines += [
                f'sudo mkdir -p {d} && sudo chown "$USER" {d}',
                f"mountpoint -q {d} || gcsfuse --implicit-dirs {b} {d}",
            ]
    return "\n".join(lines)


def train_command_words(config: str, workdir: str, overrides: Sequence[str] = ()) -> list[str]:
    """The launcher's argv on every worker; `--distributed=on` asks JAX to auto-detect the slice
    (on GCE TPU VMs the worker list comes from the metadata server, not from the environment)."""
    if not workdir.startswith("gs://"):
        raise ValueError(
            f"--workdir={workdir!r}: on a TPU slice the workdir must be on GCS (gs://bucket/...), "
            f"shared by all workers and kept when the VMs go away"
        )
    return [
        f"{REMOTE_VENV}/bin/python",
        "launch/train.py",
        f"--config={config}",
        f"--workdir={workdir}",
        "--distributed=on",
        *overrides,
    ]


def train_script(
    config: str,
    workdir: str,
    overrides: Sequence[str] = (),
    env: Sequence[tuple[str, str]] = (),
    detach: bool = True,
) -> str:
    """Starts training in the code directory. Detached (the default), the run survives the ssh
    session: output goes to ~/vavae-train.log, the process group id to ~/vavae-train.pid."""
    words = train_command_words(config, workdir, overrides)
    command = _home(words[0]) + " " + shlex.join(words[1:])
    log, pid = _home(REMOTE_LOG), _home(REMOTE_PID)
    lines = ["set -euo pipefail", f"cd {_home(REMOTE_DIR)}"]
    for key, value in env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"--env {key}={value}: {key!r} is not a variable name")
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(
        f'if [ -f {pid} ] && kill -0 "$(cat {pid})" 2>/dev/null; then '
        f'echo "a run is still going on $(hostname) (pid $(cat {pid})): stop it first" >&2; '
        f"exit 1; fi"
    )
    if detach:
        lines += [
            f"setsid nohup {command} > {log} 2>&1 < /dev/null &",
            f"echo $! > {pid}",
            f'echo "started on $(hostname): pid $!, log $HOME/{REMOTE_LOG}"',
        ]
    else:
        lines.append(f"{command} 2>&1 | tee {log}")
    return "\n".join(lines)


def stop_script(timeout_s: int = 600) -> str:
    """SIGTERM to the run's process group (the trainer saves a checkpoint first), then waits."""
    pid = _home(REMOTE_PID)
    return "\n".join(
        [
            f'if [ ! -f {pid} ]; then echo "no run on $(hostname)"; exit 0; fi',
            f'p="$(cat {pid})"',
            'if kill -0 "$p" 2>/dev/null; then kill -TERM -- "-$p"; fi',
            f'for _ in $(seq {int(timeout_s)}); do kill -0 "$p" 2>/dev/null || break; sleep 1; done',
            'if kill -0 "$p" 2>/dev/null; then echo "still running on $(hostname)" >&2; exit 1; fi',
            f"rm -f {pid}",
            'echo "stopped on $(hostname)"',
        ]
    )


def logs_script(lines: int = 100, follow: bool = True) -> str:
    return f"tail -n {int(lines)}{' -f' if follow else ''} {_home(REMOTE_LOG)}"


CHECK_SCRIPT = f"{_home(REMOTE_VENV + '/bin/python')} -c " + shlex.quote(
    "import jax; jax.distributed.initialize(); "
    "print(jax.process_index(), jax.process_count(), jax.device_count())"
)


# ----------------------------------------------------------------------------------------------
# Running (or printing) the steps
# ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, dry_run: bool):
        self.dry_run = dry_run

    def run(self, argv: list[str], script: str | None = None) -> None:
        if script is not None:  # the remote script, readable (it is inside argv, quoted)
            print("# remote script:\n" + "\n".join("#   " + ln for ln in script.splitlines()))
        print("+ " + shlex.join(argv), flush=True)
        if not self.dry_run:
            subprocess.run(argv, check=True)

    def state(self, tpu: Tpu) -> str | None:
        """The VM's (or queued resource's) state, None when it does not exist."""
        argv = describe_command(tpu)
        print("+ " + shlex.join(argv), flush=True)
        if self.dry_run:
            return None
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode == 0:
            return out.stdout.strip()
        if "NOT_FOUND" in out.stderr or "not found" in out.stderr:
            return None
        raise SystemExit(f"{shlex.join(argv)} failed:\n{out.stderr.strip()}")


def create_or_reuse(runner: Runner, tpu: Tpu, poll_s: float = 30.0) -> None:
    ready = "ACTIVE" if tpu.queued else "READY"
    state = runner.state(tpu)
    if state == ready:
        print(f"reusing {tpu.name} ({state})")
        return
    if state is not None and state not in (
        "WAITING_FOR_RESOURCES",
        "PROVISIONING",
        "ACCEPTED",
        "CREATING",
    ):
        raise SystemExit(
            f"{tpu.name} exists in state {state}: delete it first (run_tpu.py delete ...)"
        )
    if state is None:
        runner.run(create_command(tpu))
    if runner.dry_run:
        return
    while (state := runner.state(tpu)) != ready:  # queued resources wait for capacity
        if state in ("FAILED", "SUSPENDED", None):
            raise SystemExit(f"{tpu.name}: state {state}; see `gcloud compute tpus ... describe`")
        print(f"{tpu.name}: {state}, waiting ...", flush=True)
        time.sleep(poll_s)


def copy_code(runner: Runner, tpu: Tpu, root: str | pathlib.Path) -> None:
    """Packs the working tree at `root` and copies it to every worker."""
    local = f"/tmp/{tpu.name}-{REMOTE_ARCHIVE}"
    runner.run(archive_command(str(root), local))
    runner.run(scp_command(tpu, local, REMOTE_ARCHIVE))
