"""vavae_jax.runtime.tpu and launch/tpu/run_tpu.py: the gcloud command lines and the remote
scripts, without a network.

The remote scripts are also run here with bash against a fake home directory whose "python"
records its arguments: what train.py would receive on a worker, quoting included. The command
line runs as a subprocess with --dry_run, a fake `gcloud` and `tar` first on its PATH.
"""

from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from vavae_jax.runtime import tpu as rt

ROOT = pathlib.Path(__file__).resolve().parents[1]

TRICKY = [
    "--config.data.manual_dir=/mnt/data/image net",  # a space
    '--config.variant=it\'s "quoted"',  # both quotes
    "--config.data.root=$HOME/`id`;rm -rf x",  # shell syntax that must stay literal
]


def _remote(argv: list[str]) -> str:
    """The one --command argument of a gcloud ssh command line."""
    commands = [a for a in argv if a.startswith("--command=")]
    assert len(commands) == 1
    return commands[0].removeprefix("--command=")


def _fake_home(tmp_path: pathlib.Path, python_body: str) -> pathlib.Path:
    home = tmp_path / "home"
    (home / rt.REMOTE_DIR).mkdir(parents=True)
    python = home / rt.REMOTE_VENV / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/bash\n" + python_body)
    python.chmod(0o755)
    return home


def _run_remote(command: str, home: pathlib.Path) -> subprocess.CompletedProcess:
    """Runs a remote command line as the worker's login shell would: `$SHELL -c command`."""
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------------------------------------------------
# gcloud command lines
# ----------------------------------------------------------------------------------------------
def test_create_tpu_vm():
    tpu = rt.Tpu(name="ldit", zone="us-west4-a", accelerator_type="v5litepod-64")
    assert rt.create_command(tpu) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "ldit",
        "--zone=us-west4-a",
        "--version=v2-alpha-tpuv5-lite",
        "--accelerator-type=v5litepod-64",
    ]


def test_create_flags_project_spot_network():
    tpu = rt.Tpu(
        name="x",
        zone="us-central2-b",
        accelerator_type="v4-32",
        project="my-proj",
        spot=True,
        reserved=True,
        network="net",
        subnetwork="sub",
        service_account="sa@my-proj.iam.gserviceaccount.com",
    )
    argv = rt.create_command(tpu)
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "x"]
    for flag in (
        "--zone=us-central2-b",
        "--project=my-proj",
        "--version=tpu-ubuntu2204-base",
        "--accelerator-type=v4-32",
        "--spot",
        "--reserved",
        "--network=net",
        "--subnetwork=sub",
        "--service-account=sa@my-proj.iam.gserviceaccount.com",
    ):
        assert flag in argv
    assert "--preemptible" not in argv
    pre = rt.create_command(rt.Tpu(name="x", zone="z", preemptible=True))
    assert "--preemptible" in pre and "--spot" not in pre


def test_create_queued_resource():
    tpu = rt.Tpu(
        name="ldit",
        zone="us-east5-a",
        accelerator_type="v6e-256",
        queued=True,
        spot=True,
        valid_until_duration="6h",
        project="p",
    )
    assert rt.create_command(tpu) == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "create",
        "ldit-qr",
        "--zone=us-east5-a",
        "--project=p",
        "--node-id=ldit",
        "--runtime-version=v2-alpha-tpuv6e",
        "--accelerator-type=v6e-256",
        "--spot",
        "--valid-until-duration=6h",
    ]
    assert rt.describe_command(tpu)[3:6] == ["queued-resources", "describe", "ldit-qr"]
    assert "--format=value(state.state)" in rt.describe_command(tpu)
    assert rt.delete_command(tpu) == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "ldit-qr",
        "--force",
        "--quiet",
        "--zone=us-east5-a",
        "--project=p",
    ]


def test_describe_and_delete_vm():
    tpu = rt.Tpu(name="ldit", zone="z-a")
    assert rt.describe_command(tpu) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "describe",
        "ldit",
        "--format=value(state)",
        "--zone=z-a",
    ]
    assert rt.delete_command(tpu) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "delete",
        "ldit",
        "--quiet",
        "--zone=z-a",
    ]


def test_runtime_versions_and_validation():
    versions = {
        a: rt.Tpu(name="x", zone="z", accelerator_type=a).version
        for a in ("v5litepod-16", "v5p-128", "v6e-8", "v4-8")
    }
    assert versions == {
        "v5litepod-16": "v2-alpha-tpuv5-lite",
        "v5p-128": "v2-alpha-tpuv5",
        "v6e-8": "v2-alpha-tpuv6e",
        "v4-8": "tpu-ubuntu2204-base",
    }
    assert rt.Tpu(name="x", zone="z", runtime_version="custom").version == "custom"
    with pytest.raises(ValueError, match="runtime_version"):
        _ = rt.Tpu(name="x", zone="z", accelerator_type="v9-8").version
    for bad in (
        dict(name="Bad_Name", zone="z"),
        dict(name="x", zone=""),
        dict(name="x", zone="z", spot=True, preemptible=True),
        dict(name="x", zone="z", valid_until_duration="1h"),
    ):
        with pytest.raises(ValueError):
            rt.Tpu(**bad)


def test_ssh_and_scp_reach_every_worker():
    tpu = rt.Tpu(name="ldit", zone="z-a", project="p", internal_ip=True)
    argv = rt.ssh_command(tpu, "echo hi")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ldit"]
    assert "--worker=all" in argv and "--command=echo hi" in argv
    assert {"--zone=z-a", "--project=p", "--internal-ip"} <= set(argv)
    assert "--worker=3" in rt.ssh_command(tpu, "ls", worker="3")
    scp = rt.scp_command(tpu, "/tmp/a.tgz", "a.tgz")
    assert scp[4:7] == ["scp", "/tmp/a.tgz", "ldit:a.tgz"] and "--worker=all" in scp


def test_archive_excludes_local_state():
    argv = rt.archive_command("/src", "/tmp/out.tgz")
    assert argv[:3] == ["tar", "-czf", "/tmp/out.tgz"] and argv[-3:] == ["-C", "/src", "."]
    assert {"--exclude=.git", "--exclude=.venv", "--exclude=runs"} <= set(argv)


# ----------------------------------------------------------------------------------------------
# Remote scripts, quoting checked by running them
# ----------------------------------------------------------------------------------------------
def test_train_command_reaches_python_verbatim(tmp_path):
    home = _fake_home(tmp_path, 'printf "%s\\0" "$PWD" "$@" > "$HOME/argv"\n')
    script = rt.train_script(
        "configs/x.py:small,b",
        "gs://bkt/runs/a b",
        TRICKY,
        env=[("TFDS_DATA_DIR", "/mnt/data/tf ds"), ("A", "'\"")],
        detach=False,
    )
    command = _remote(rt.ssh_command(rt.Tpu(name="t", zone="z"), rt.bash(script)))
    out = _run_remote(command, home)
    assert out.returncode == 0, out.stderr
    cwd, *argv = (home / "argv").read_text().split("\0")[:-1]
    assert cwd == str(home / rt.REMOTE_DIR)
    assert argv == [
        "launch/train.py",
        "--config=configs/x.py:small,b",
        "--workdir=gs://bkt/runs/a b",
        "--distributed=on",
        *TRICKY,
    ]
    assert "export TFDS_DATA_DIR='/mnt/data/tf ds'" in script


def test_env_reaches_the_trainer(tmp_path):
    home = _fake_home(tmp_path, 'printf "%s\\0" "$TFDS_DATA_DIR" "$A" > "$HOME/env"\n')
    script = rt.train_script(
        "c.py", "gs://b/w", env=[("TFDS_DATA_DIR", "/d ir"), ("A", "'\"$x")], detach=False
    )
    assert _run_remote(rt.bash(script), home).returncode == 0
    assert (home / "env").read_text().split("\0")[:-1] == ["/d ir", "'\"$x"]
    with pytest.raises(ValueError, match="variable name"):
        rt.train_script("c.py", "gs://b/w", env=[("BAD-NAME", "1")])


def test_workdir_must_be_on_gcs():
    with pytest.raises(ValueError, match="gs://"):
        rt.train_command_words("c.py", "runs/local")


def test_detached_run_refuses_a_second_start_and_stops_on_sigterm(tmp_path):
    # The fake trainer runs until SIGTERM, then writes "saved" (as the trainer checkpoints).
    home = _fake_home(
        tmp_path,
        "trap 'echo saved > \"$HOME/term\"; exit 0' TERM\nwhile true; do sleep 0.1; done\n",
    )
    start = rt.bash(rt.train_script("c.py", "gs://b/w"))
    out = _run_remote(start, home)
    assert out.returncode == 0, out.stderr
    assert "started on" in out.stdout
    pid = int((home / rt.REMOTE_PID).read_text())
    second = _run_remote(start, home)
    assert second.returncode == 1 and "still going" in second.stderr
    stopped = _run_remote(rt.bash(rt.stop_script(timeout_s=20)), home)
    assert stopped.returncode == 0, stopped.stderr
    for _ in range(50):
        if (home / "term").exists():
            break
        time.sleep(0.1)
    assert (home / "term").read_text() == "saved\n"
    assert not (home / rt.REMOTE_PID).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "no run" in _run_remote(rt.bash(rt.stop_script()), home).stdout


def test_setup_script_from_archive_and_git():
    archive = rt.setup_script()
    assert 'tar -xzf "$HOME/vavae-src.tar.gz" -C "$HOME/vavae-lightningdit-jax"' in archive
    assert '-e "$HOME/vavae-lightningdit-jax[tpu]"' in archive
    assert "--python 3.11" in archive and "gcsfuse" not in archive
    git = rt.setup_script(git_url="https://example.org/r.git", git_ref="v1 x", python="3.12")
    assert "git clone --quiet https://example.org/r.git" in git
    assert "fetch --quiet origin 'v1 x'" in git and "--python 3.12" in git
    assert "tar -xzf" not in git
    for script in (archive, git):
        subprocess.run(["bash", "-n", "-c", script], check=True)  # valid bash syntax


def test_setup_mounts_buckets_with_gcsfuse():
    script = rt.setup_script(mounts=[("gs://my-data", "/mnt/data")])
    assert "apt-get install -y -qq gcsfuse" in script
    assert "mountpoint -q /mnt/data || gcsfuse --implicit-dirs my-data /mnt/data" in script
    subprocess.run(["bash", "-n", "-c", script], check=True)
    for bad in ([("my-data/sub", "/mnt/d")], [("b", "relative")]):
        with pytest.raises(ValueError, match="BUCKET"):
            rt.setup_script(mounts=bad)
    with pytest.raises(ValueError, match="extra"):
        rt.setup_script(extra="tpu]; rm -rf /")


# ----------------------------------------------------------------------------------------------
# The command line, dry run
# ----------------------------------------------------------------------------------------------
def _run_tpu(args: list[str], tmp_path: pathlib.Path) -> subprocess.CompletedProcess:
    """`python launch/tpu/run_tpu.py args`; `gcloud` and `tar` on its PATH only record that they
    were called (a dry run must call neither)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("gcloud", "tar"):
        fake = bin_dir / tool
        fake.write_text(f'#!/bin/bash\necho {tool} >> "{tmp_path}/called"\n')
        fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(
        [sys.executable, "launch/tpu/run_tpu.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _printed_commands(stdout: str) -> list[list[str]]:
    """The `+ command` lines of a dry run, split; a quoted remote script spans several lines."""
    argvs, pending = [], None
    for line in stdout.splitlines():
        if pending is None and not line.startswith("+ "):
            continue
        pending = line[2:] if pending is None else pending + "\n" + line
        try:
            argvs.append(shlex.split(pending))
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        pending = None
    assert pending is None, pending
    return argvs


def test_dry_run_up_prints_every_step_and_runs_nothing(tmp_path):
    out = _run_tpu(
        [
            "up",
            "--name=ldit",
            "--zone=us-west4-a",
            "--accelerator_type=v5litepod-64",
            "--spot",
            "--project=p",
            "--config=configs/x.py",
            "--workdir=gs://b/runs/x",
            "--mount=gs://data:/mnt/data",
            "--env=K=V",
            "--dry_run",
            "--override=--config.seed=1",
            "--",
            TRICKY[0],
            TRICKY[1],
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "called").exists()  # nothing ran
    argvs = _printed_commands(out.stdout)
    assert out.stdout.count("\n+ ") + out.stdout.startswith("+ ") == len(argvs) == 6
    assert "# remote script:" in out.stdout
    assert [a[3:5] for a in argvs if a[0] == "gcloud"] == [
        ["tpu-vm", "describe"],
        ["tpu-vm", "create"],
        ["tpu-vm", "scp"],
        ["tpu-vm", "ssh"],
        ["tpu-vm", "ssh"],
    ]
    assert argvs[2][0] == "tar" and argvs[2][-3:] == ["-C", str(ROOT), "."]
    create = argvs[1]
    assert "--spot" in create and "--project=p" in create
    train = shlex.split(_remote(argvs[-1]))
    assert train[:2] == ["bash", "-c"]
    words = shlex.split(train[2].splitlines()[-3])
    assert words[words.index("launch/train.py") + 4 :][:3] == ["--config.seed=1", *TRICKY[:2]]


def test_cli_errors(tmp_path):
    for args, message in (
        (["train", "--name=x", "--zone=z", "--dry_run"], "--config and --workdir"),
        (["ssh", "--name=x", "--zone=z", "--dry_run"], "--command"),
        (["setup", "--name=x", "--zone=z", "--mount=nocolon", "--dry_run"], "expected A:B"),
    ):
        out = _run_tpu(args, tmp_path)
        assert out.returncode == 1 and message in out.stderr, (args, out.stderr)
    assert not (tmp_path / "called").exists()


def test_create_or_reuse_reads_the_state(monkeypatch, capsys):
    """Not found: create; READY: reuse; another error of gcloud: stop with its message."""
    calls = []

    def fake_run(argv, capture_output=False, text=False, check=False):
        calls.append(argv[4])
        if argv[4] == "describe":
            return subprocess.CompletedProcess(argv, *answers.pop(0))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(rt.subprocess, "run", fake_run)
    tpu = rt.Tpu(name="t", zone="z")
    answers = [
        (1, "", "ERROR: (gcloud) NOT_FOUND: node t"),
        (0, "CREATING\n", ""),
        (0, "READY\n", ""),
    ]
    rt.create_or_reuse(rt.Runner(dry_run=False), tpu, poll_s=0)
    assert calls == ["describe", "create", "describe", "describe"]
    calls.clear()
    answers = [(0, "READY\n", "")]
    rt.create_or_reuse(rt.Runner(dry_run=False), tpu)
    assert calls == ["describe"] and "reusing t" in capsys.readouterr().out
    answers = [(1, "", "ERROR: (gcloud) PERMISSION_DENIED")]
    with pytest.raises(SystemExit, match="PERMISSION_DENIED"):
        rt.create_or_reuse(rt.Runner(dry_run=False), tpu)
    answers = [(0, "PREEMPTED\n", "")]
    with pytest.raises(SystemExit, match="delete it first"):
        rt.create_or_reuse(rt.Runner(dry_run=False), tpu)


def test_documented_configs_exist():
    """The config files the TPU guide and run_tpu.py name are the repository's own."""
    for doc in ("launch/tpu/README.md", "launch/tpu/run_tpu.py"):
        named = set(re.findall(r"configs/[\w.-]+\.py", (ROOT / doc).read_text()))
        assert named, doc
        assert all((ROOT / c).is_file() for c in named), (doc, sorted(named))
