"""Argument parsing shared by the scripts: dataclasses + TrainingArguments, YAML first, one-line errors."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import yaml
from transformers import HfArgumentParser


logger = logging.getLogger("clmlab")


class UsageError(Exception):
    """Bad input. The message says what is wrong and how to fix it; the scripts exit with status 2."""


def require(ok: bool, flag: str, value, rule: str) -> None:
    """For argument checks: one line naming the flag, the value given and what it must be."""
    if not ok:
        raise UsageError(f"--{flag} {value}: {rule}")


def first_line(error: BaseException) -> str:
    """The gist of a library's exception, for a one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


_failure_handlers: list[Callable[[BaseException], None]] = []
_running_scripts = 0  # scripts inside exits_on_usage_error now: only they collect failure handlers


def on_failure(handler: Callable[[BaseException], None]) -> None:
    """Have `handler(error)` called if the running script fails (any exception, Ctrl-C included), before the
    error is reported: how a training run undoes what it wrote, or records that it failed. Outside a script
    (a notebook, a library caller) nothing is registered, so no handler outlives its call."""
    if _running_scripts:
        _failure_handlers.append(handler)


def exits_on_usage_error(main: Callable) -> Callable:
    """Turn a UsageError into one line on stderr and exit status 2, with no traceback; on any failure, first
    call the handlers registered with `on_failure`."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _running_scripts
        _running_scripts += 1
        try:
            return main(*args, **kwargs)
        except BaseException as error:
            if not (isinstance(error, SystemExit) and error.code in (0, None)):
                for handler in reversed(_failure_handlers):
                    try:
                        handler(error)
                    except Exception as cleanup_error:  # the original error is the one to report
                        print(f"warning: cleaning up after the error failed: {first_line(cleanup_error)}", file=sys.stderr)
            if isinstance(error, UsageError):
                print(f"error: {error}", file=sys.stderr, flush=True)
                raise SystemExit(2) from None
            raise
        finally:
            _running_scripts -= 1
            if not _running_scripts:
                _failure_handlers.clear()

    return wrapper


def setup_logging() -> None:
    """The one logging setup of every script: INFO from the main process, warnings only from the others
    (launchers set RANK), so a multi-GPU log is not printed once per GPU."""
    main_process = os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
    level = logging.INFO if main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=level)
    # Where the host already set logging up (a notebook, pytest), basicConfig does nothing: the project's own
    # loggers still say what they decide.
    for name in ("clmlab", "callbacks", "run_clm", "run_sft", "run_prepare", "run_eval", "run_infer", "run_compare", "run_sweep"):
        logging.getLogger(name).setLevel(level)


class ArgumentParser(HfArgumentParser):
    # argparse prints the whole usage block before the error; one line is easier to act on.
    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class _Yaml12Loader(yaml.SafeLoader):
    """YAML as version 1.2 reads booleans: only true/false. YAML 1.1 (PyYAML's default) also reads no, yes, on
    and off as booleans, which turns `eval_strategy: no` into False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def read_yaml(path: str | Path, what: str = "config file"):
    """A YAML file read with YAML 1.2 booleans; a missing or malformed file is one line."""
    try:
        return yaml.load(Path(path).read_text(), Loader=_Yaml12Loader)
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as error:
        raise UsageError(f"{what} {path} is not valid YAML ({first_line(error)})") from None


def mapping_to_argv(config: dict, drop: set[str] = frozenset(), lists: set[str] = frozenset()) -> list[str]:
    """Flags for a mapping of flag names to values: a list gives several values, a mapping given to a flag that
    takes several values (`lists`) its `name=value` items, any other mapping its JSON."""
    argv: list[str] = []
    for key, value in config.items():
        if value is None or key in drop:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict) and key in lists:
            argv += [f"--{key}", *(f"{name}={item}" for name, item in value.items())]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def yaml_to_argv(path: str | Path, known: set[str], drop: set[str] = frozenset(), lists: set[str] = frozenset()) -> list[str]:
    """Turn a YAML mapping into command-line flags, so a YAML file mirrors the command line one to one."""
    config = read_yaml(path)
    if config is None:
        return []
    if not isinstance(config, dict):
        raise UsageError(f"config file {path} must be a mapping of argument names to values")
    unknown = sorted(set(config) - known)
    if unknown:
        raise UsageError(f"config file {path} has unknown keys {unknown}; the keys are the script's flags without '--'")
    return mapping_to_argv(config, drop, lists)


def parse_args(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    alternatives: Sequence[tuple[str, ...]] = (),
    base_config: tuple[str | Path, Sequence[str]] | None = None,
):
    """Parse `[config.yaml] [--flag value ...]`; flags given after the YAML file override it.

    `alternatives` are groups of flags that say the same thing in different units (--max_steps and
    --max_train_tokens): one of a group given on the command line replaces the others in the YAML file.
    `base_config` is (YAML file, flags): with no YAML file and none of those flags on the command line, the
    file is the base and the flags given override it.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(dataclass_types, prog=prog)
    if base_config and not (argv and argv[0].endswith((".yaml", ".yml"))) and "-h" not in argv and "--help" not in argv:
        path, flags = base_config
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
        if not given & set(flags):  # no data and no model: the quickstart's
            shown = Path(path).relative_to(Path(path).parents[2]) if len(Path(path).parents) > 2 else path
            logger.info(f"no data and no model given: the built-in quickstart ({shown}) is the base"
                        f"{', with your flags on top' if argv else ''}")
            argv = [str(path), *argv]
    if argv and argv[0].endswith((".yaml", ".yml")):
        known = {f.name for cls in dataclass_types for f in fields(cls) if f.init}
        given = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv[1:] if a.startswith("--")}
        drop = {flag for group in alternatives if given & set(group) for flag in group if flag not in given}
        lists = {f.name for cls in dataclass_types for f in fields(cls) if f.init and f.metadata.get("nargs")}
        argv = yaml_to_argv(argv[0], known, drop, lists) + argv[1:]
    try:
        return parser.parse_args_into_dataclasses(args=argv)
    except ValueError as error:
        if "not used by the HfArgumentParser" in str(error):
            leftover = str(error).split(":", 1)[1].strip()
            raise UsageError(f"unrecognized arguments {leftover} (see `{parser.prog} --help`; a YAML file must come first)") from None
        # TrainingArguments.__post_init__ rejects inconsistent combinations with a ValueError.
        raise UsageError(first_line(error)) from None
