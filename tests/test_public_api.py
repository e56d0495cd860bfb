"""The public API: the README's "Use the modules in your own code" snippet, run as it is, and
every name of `vavae_jax.__all__` and `lightningdit_jax.__all__` resolves. Importing the packages
stays cheap: no torch, TensorFlow or other heavy stack at import time."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import lightningdit_jax
import vavae_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MARKER = "<!-- tests/test_public_api.py runs this block"


def readme_api_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    if README_MARKER not in text:
        raise AssertionError(f"README.md lost the marked block ({README_MARKER!r})")
    return text.split(README_MARKER, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_readme_snippet_runs():
    namespace: dict = {"__name__": "readme_snippet"}
    exec(compile(readme_api_snippet(), "README.md (public API snippet)", "exec"), namespace)
    assert namespace["x_rec"].shape == namespace["x"].shape == (2, 32, 32, 3)
    assert namespace["images"].shape == (2, 32, 32, 3)
    assert namespace["v"].shape == namespace["z"].shape == (2, 8, 8, 8)
    for name in ("vf", "kl", "loss"):
        assert bool(namespace[name] == namespace[name]), f"{name} is NaN"


@pytest.mark.parametrize("package", [vavae_jax, lightningdit_jax], ids=lambda p: p.__name__)
def test_all_names_resolve(package):
    names = package.__all__
    assert len(names) == len(set(names)), "duplicates in __all__"
    missing = [n for n in names if getattr(package, n, None) is None]
    assert not missing, f"{package.__name__}.__all__ names that do not resolve: {missing}"


def test_import_is_cheap():
    heavy = ("torch", "tensorflow", "transformers", "orbax", "grain", "tensorflow_datasets")
    code = (
        "import sys, vavae_jax, lightningdit_jax; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"importing the packages imports {out.stdout.strip()}"
