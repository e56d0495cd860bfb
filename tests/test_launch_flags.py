"""launch/train.py adds its GPU collective flags to XLA_FLAGS without overriding the user's."""

from vavae_jax.runtime import distributed


def test_default_xla_flags_keep_the_users_choice():
    flags = distributed.default_xla_flags("")
    for key, value in distributed.GPU_XLA_FLAGS.items():
        assert f"{key}={value}" in flags
    mine = "--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x"
    flags = distributed.default_xla_flags(mine)
    assert flags.startswith(mine)
    assert flags.count("--xla_gpu_enable_latency_hiding_scheduler") == 1
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=134217728" in flags
