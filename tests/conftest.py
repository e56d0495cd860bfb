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
# For one program (`jax.jit(..., compiler_options=...)`, `aot.compile_report(...)`) whose test
# compares it only with another compiled alike, or reads only XLA's memory and FLOP figures:
# LLVM at -O0 without its expensive passes compiles the LightningDiT XL/1 step in 22 s instead
# of 54 and the VA-VAE step and its naive twin in a fifth less time; the code runs slower.
CHEAP_COMPILE_OPTIONS = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}
# The same for every program of a CLI a test starts, appended to its XLA_FLAGS (the last setting
# of a flag wins), where the test checks what the CLI writes, not its last-ulp rounding.
CHEAP_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

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


# The order in which `-n 2` hands out work (pyproject.toml: `--dist loadgroup
# --no-loadscope-reorder`; a worker takes the next unit, a whole xdist group or one test, when
# it has two tests left): the longest units first, the many short tests last, so that both
# workers run until the end and neither waits while the other finishes a long test.
_FIRST_GROUPS = ("vavae_trainer", "lightningdit_trainer")  # ~4 and ~2 minutes on 2 cores


def _dispatch_rank(item) -> int:
    if item.nodeid.startswith("tests/test_e2e.py::"):  # the README chain: ~3 minutes, alone
        return 0
    groups = [
        m.args[0] if m.args else m.kwargs.get("name") for m in item.iter_markers("xdist_group")
    ]
    if groups:
        return 1 + _FIRST_GROUPS.index(groups[0]) if groups[0] in _FIRST_GROUPS else 3
    return 4 if item.get_closest_marker("slow") else 5


def pytest_collection_modifyitems(items):
    """Longest first (see `_dispatch_rank`); a stable sort keeps each file's order."""
    items.sort(key=_dispatch_rank)


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


@pytest.fixture(scope="session")
def vavae_fsdp_run(sample_images_dir, tmp_path_factory):
    """(config, `train.run`'s result, workdir) of the smallest VA-VAE run (tests/test_parallel.py:
    two steps of tests/test_vavae_train.py's tiny config), uninterrupted on the FSDP mesh
    (data=2 x fsdp=4). It is the fsdp run of the mesh test and the uninterrupted run of the
    kill-and-resume test, trained once for both (one xdist group: one worker)."""
    from tests.test_parallel import smallest_vavae_config
    from vavae_jax import train

    config = smallest_vavae_config(sample_images_dir)
    workdir = tmp_path_factory.mktemp("vavae_fsdp") / "run"
    return config, train.run(config, str(workdir)), workdir


def load_config(file: str, variant: str | None = None):
    """configs/<file>[:variant] as `--config=configs/<file>[:variant]` gives it (before
    overrides): config files are loaded by path, like config_flags does, never imported."""
    from vavae_jax.runtime import cli

    path = str(ROOT / "configs" / file)
    return cli.config_from_file(path if variant is None else f"{path}:{variant}")
