"""launch/train.py adds its GPU collective flags to XLA_FLAGS without overriding the user's."""

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_train", ROOT / "launch" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_xla_flags_keep_the_users_choice():
    train = _launcher()
    flags = train.default_xla_flags("")
    for key, value in train.GPU_XLA_FLAGS.items():
        assert f"{key}={value}" in flags
    mine = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"
    flags = train.default_xla_flags(mine)
    assert flags.startswith(mine)
    assert flags.count("--xla_gpu_enable_latency_hiding_scheduler") == 1
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728" in flags
