"""Front-door messages of the scripts that take `--config=FILE[:variants]` (ml_collections
config_flags under absl): a mistyped field or variant, and --help.

    from vavae_jax.runtime import cli
    app.run(main, flags_parser=cli.parse_flags)

- A mistyped override (`--config.optim.lrr=1`) or variant (`--config=FILE.py:smal`) prints one
  or two lines naming it and the nearest valid names, and exits with status 2 (a usage error),
  instead of config_flags' chained traceback or absl's `FATAL Flags parsing error`.
- `--help` (`-h`, `--helpshort`) prints the script's flags and then every field of the config
  given by --config with its default, as `--config.a.b=value` (`--helpfull`: absl's own).
"""

from __future__ import annotations

import difflib
import importlib.util
import pathlib
import re
import sys
from collections.abc import Iterator

from absl import app, flags
from ml_collections import config_dict

USAGE_ERROR = 2
HELP_FLAGS = ("-h", "--help", "-?", "--helpshort")


def parse_flags(argv: list[str], *, name: str = "config") -> list[str]:
    """absl `flags_parser`: parses `argv` into flags.FLAGS; returns the remaining arguments."""
    try:  # what FLAGS(argv) will see, --flagfile contents included
        args = [argv[0], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)]
    except (flags.Error, OSError) as e:
        _fail(f"error: {e}")
    if any(a in HELP_FLAGS for a in args[1:]):
        print_help(args, name=name)
        sys.exit(0)
    config_arg = _flag_value(args, name)
    if config_arg is None:
        _fail(
            f"error: --{name} is required, e.g. --{name}=configs/vavae_f16d32.py[:variants]; "
            f"its fields: python {pathlib.Path(argv[0]).as_posix()} --{name}=FILE --help"
        )
    if not pathlib.Path(config_arg.partition(":")[0]).is_file():
        _fail(load_config(config_arg, name=name)[1])  # config_flags would defer this error
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
        message = explain(args, name=name)
        if message is None:
            if not isinstance(e, flags.Error):
                raise
            message = f"error: {e}"
        _fail(message)


def _fail(message: str):
    sys.stderr.write(f"{message}\n")
    sys.exit(USAGE_ERROR)


def explain(argv: list[str], *, name: str = "config") -> str | None:
    """A short message for a bad config file, variant or override in `argv`; None when they
    are all valid (the error was elsewhere)."""
    config_arg = _flag_value(argv, name)
    if config_arg is None:
        return None
    config, message = load_config(config_arg, name=name)
    if message is not None:
        return message
    for path in _overrides(argv, name):
        message = _check_path(config, path, name)
        if message is not None:
            return message
    return None


def load_config(config_arg: str, *, name: str = "config"):
    """(config, None), or (None, a short message) when the file or variant is bad. Like
    config_flags: `FILE` calls get_config(), `FILE:arg` calls get_config(arg)."""
    path, sep, variant = config_arg.partition(":")
    file = pathlib.Path(path)
    if not file.is_file():
        near = _nearest(file.name, [p.name for p in file.parent.glob("*.py")])
        hint = f"; did you mean {file.parent / near[0]}?" if near else ""
        return None, f"error: --{name}={config_arg}: no such config file{hint}"
    spec = importlib.util.spec_from_file_location(f"_{name}_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        return (module.get_config(variant) if sep else module.get_config()), None
    except ValueError as e:
        return None, _variant_message(config_arg, name, path, variant, str(e))


def config_from_file(config_arg: str):
    """The config of `FILE[:variants]` as `--config=FILE[:variants]` gives it before overrides
    (tests and benchmarks build their configs this way); ValueError naming a bad file or variant."""
    config, message = load_config(config_arg)
    if message is not None:
        raise ValueError(message.removeprefix("error: --config="))
    return config


def _variant_message(config_arg, name, path, variant, error: str) -> str:
    # The configs name the valid variants as quoted strings after "expected".
    _, _, expected = error.partition("expected")
    valid = re.findall(r"'([^']+)'", expected)
    fixed = []
    for part in variant.split(","):
        near = _nearest(part, valid) if part not in valid else [part]
        fixed.append(near[0] if near else part)
    message = f"error: --{name}={config_arg}: {error.splitlines()[0]}"
    if valid and fixed != variant.split(","):
        message += f"\n  did you mean --{name}={path}:{','.join(fixed)}?"
    return message


def _check_path(config, path: str, name: str) -> str | None:
    """A message when the dotted field `path` does not exist in `config`, else None."""
    node, done = config, []
    for key in path.split("."):
        if not isinstance(node, config_dict.ConfigDict) or "[" in key:
            return None  # a list or dataclass field: config_flags has the last word
        if key not in node:
            where = ".".join(done)
            near = [".".join([*done, k]) for k in _nearest(key, node.keys())]
            if not near:  # the right name under another parent: --config.lr -> optim.lr
                leaves = [p for p, _ in _fields(config)]
                near = [p for p in leaves if p.rsplit(".", 1)[-1] == key][:3] or _nearest(
                    path, leaves
                )
            hint = (
                "did you mean " + " or ".join(f"--{name}.{n}" for n in near) + "?" if near else ""
            )
            if not hint:
                hint = f"see the fields with --{name}=... --help"
            parent = f"{name}.{where}" if where else name
            return f"error: --{name}.{path}: {parent} has no field {key!r}; {hint}"
        node, done = node[key], [*done, key]
    return None


def print_help(argv: list[str], *, name: str = "config") -> None:
    """The script's own flags, then the fields of the config given by --config."""
    app.usage(shorthelp=True, writeto_stdout=True)
    config_arg = _flag_value(argv, name)
    script = pathlib.Path(argv[0]).as_posix()
    if config_arg is None:
        configs = sorted(str(p) for p in pathlib.Path("configs").glob("*.py"))
        example = configs[0] if configs else "configs/X.py"
        print(f"\nTo list the config's fields: python {script} --{name}={example} --help")
        if configs:
            print(f"Configs here: {', '.join(configs)}")
        return
    config, message = load_config(config_arg, name=name)
    if message is not None:
        print(f"\n{message}")
        return
    print(f"\nFields of {config_arg} (defaults; override any with --{name}.<field>=<value>):")
    for path, value in _fields(config):
        print(f"  --{name}.{path}={value!r}")


def _fields(config, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key, value in config.items():
        if isinstance(value, config_dict.ConfigDict):
            yield from _fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _nearest(word: str, candidates) -> list[str]:
    return difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=v` or `--name v` in argv (the last one wins, as in absl)."""
    value = None
    for i, a in enumerate(argv[1:], 1):
        if a in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith((f"--{name}=", f"-{name}=")):
            value = a.split("=", 1)[1]
    return value


def _overrides(argv: list[str], name: str) -> list[str]:
    """The dotted field paths of the `--name.a.b[=v]` overrides in argv."""
    out = []
    for a in argv[1:]:
        if a == "--":
            break
        for prefix in (f"--{name}.", f"-{name}.", f"--no{name}."):
            if a.startswith(prefix):
                out.append(a[len(prefix) :].split("=", 1)[0])
    return out
