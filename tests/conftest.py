import os
import pathlib
import tempfile

# Tests run on CPU with 8 fake devices so that mesh tests need no accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the session: the trainer tests compile the same step several times
# (uninterrupted run, killed run, resumed run).
_CACHE = tempfile.mkdtemp(prefix="jax_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    path = SHARED / "fixtures"
    if not path.is_dir():
        raise FileNotFoundError(f"reference fixtures not found at {path}: tests expect ../shared")
    return path


@pytest.fixture(scope="session")
def sample_images_dir() -> pathlib.Path:
    path = SHARED / "data" / "imagenet-sample-256"
    if not path.is_dir():
        raise FileNotFoundError(f"sample images not found at {path}: tests expect ../shared/data")
    return path
