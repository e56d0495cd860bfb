import os
import pathlib
import tempfile

# Tests run on CPU with 8 fake devices so that mesh tests need no accelerator.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The test programs are tiny: XLA's compile, not their run, is most of the suite's time. LLVM at
# -O1 instead of -O3 compiles the VA-VAE trainer's init and step in a third and a half of the
# time (74 -> 26 s, 164 -> 86 s on 2 shared cores) for steps 1.6x slower, with the same numbers
# (-O0 compiles a little faster still but changes the float rounding and runs 2.6x slower). The
# CLIs the tests start inherit these flags (tests/test_e2e.py drops only the device count).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=1"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAGS}")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One compilation cache for the whole test run, shared by the xdist workers and by the CLIs the
# tests start as subprocesses (they inherit the environment): the trainer tests compile the same
# steps several times (uninterrupted, killed, resumed runs; one mesh after another). Every
# program is cached, however quick its compile: each process (two workers, dozens of CLIs)
# otherwise compiles the same small eager-mode programs again (random init of every weight
# shape, data preprocessing), 0.1-0.3 s each on 2 cores (the README chain of tests/test_e2e.py:
# 237 -> 188 s). No size limit: a limit turns on LRU eviction, which holds one file lock over
# every read and write and lists and stats the whole folder on each write (quadratic in the
# thousands of entries: the workers then queued on the lock). Without it, a write is a plain
# file write; a process that reads an entry while another writes it fails to decompress it,
# warns and compiles (jax._src.compiler._cache_read), with the same result.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_CACHE = os.path.join(tempfile.gettempdir(), f"vavae_jax_tests_{_RUN}", "jax_cache")
os.makedirs(_CACHE, exist_ok=True)
for _key, _value in (
    ("jax_compilation_cache_dir", _CACHE),
    ("jax_persistent_cache_min_compile_time_secs", 0),
    ("jax_persistent_cache_min_entry_size_bytes", 0),
    ("jax_compilation_cache_max_size", -1),
):
    jax.config.update(_key, _value)
    os.environ[_key.upper()] = str(_value)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def pytest_collection_modifyitems(items):
    """The README chain (tests/test_e2e.py, the longest test) first: under `-n 2` it then runs
    beside the others from the start instead of being the last one running."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/test_e2e.py::"))


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


def load_config(file: str, variant: str | None = None):
    """configs/<file>[:variant] as `--config=configs/<file>[:variant]` gives it (before
    overrides): config files are loaded by path, like config_flags does, never imported."""
    from vavae_jax.runtime import cli

    path = str(ROOT / "configs" / file)
    return cli.config_from_file(path if variant is None else f"{path}:{variant}")
