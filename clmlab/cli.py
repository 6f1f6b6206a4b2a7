"""Argument parsing shared by the scripts: dataclasses + TrainingArguments, YAML first, one-line errors."""

from __future__ import annotations

import functools
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import yaml
from transformers import HfArgumentParser


class UsageError(Exception):
    """Bad input. The message says what is wrong and how to fix it; the scripts exit with status 2."""


def first_line(error: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def exits_on_usage_error(main: Callable) -> Callable:
    """Turn a UsageError into one line on stderr and exit status 2, with no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    return wrapper


class ArgumentParser(HfArgumentParser):
    # argparse prints the whole usage block before the error; one line is easier to act on.
    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def yaml_to_argv(path: str | Path, known: set[str], drop: set[str] = frozenset()) -> list[str]:
    """Turn a YAML mapping into command-line flags, so a YAML file mirrors the command line one to one."""
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UsageError(f"config file {path} is not valid YAML ({first_line(error)})") from None
    if config is None:
        return []
    if not isinstance(config, dict):
        raise UsageError(f"config file {path} must be a mapping of argument names to values")
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown keys {unknown}; the keys are the script's flags without '--'")
    argv: list[str] = []
    for key, value in config.items():
        if value is None or key in drop:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    alternatives: Sequence[tuple[str, ...]] = (),
):
    """Parse `[config.yaml] [--flag value ...]`; flags given after the YAML file override it.

    `alternatives` are groups of flags that say the same thing in different units (--max_steps and
    --max_train_tokens): one of a group given on the command line replaces the others in the YAML file.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(dataclass_types, prog=prog)
    if argv and argv[0].endswith((".yaml", ".yml")):
        known = {f.name for cls in dataclass_types for f in fields(cls) if f.init}
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv[1:] if a.startswith("--")}
        drop = {flag for group in alternatives if given & set(group) for flag in group if flag not in given}
        argv = yaml_to_argv(argv[0], known, drop) + argv[1:]
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        if "not used by the HfArgumentParser" in str(error):
            leftover = str(error).split(":", 1)[1].strip()
            raise UsageError(f"unrecognized arguments {leftover} (see `{parser.prog} --help`; a YAML file must come first)") from None
        # TrainingArguments.__post_init__ rejects inconsistent combinations with a ValueError.
        raise UsageError(first_line(error)) from None
