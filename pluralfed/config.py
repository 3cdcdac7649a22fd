"""Layered configuration for services: defaults < TOML file < environment < command line.

A config is a flat dataclass of simple fields (str, int, float, bool, Path, optional ones, and
tuples of two ints, tuples of names). The TOML file may group keys in tables; a table's keys are joined with "_"
(`[tls] dir = ...` sets `tls_dir`). Environment variables are PREFIX + the upper-case field
name (`PLURALFED_NODE_TLS_DIR`). Every value is checked and a bad one names its source.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import numbers
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pluralfed.errors import InputError
from pluralfed.fsutil import InputTooLarge, read_input_bytes, size_text

T = TypeVar("T")

log = logging.getLogger(__name__)


class ConfigValueError(InputError):
    """A value a config dataclass refuses in its __post_init__. It carries the key so that
    `load_config` can say where the value came from (file, environment variable or option);
    raised by direct construction it reads "<what> config: <message>"."""

    def __init__(
        self,
        key: str,
        message: str,
        what: str | None = "configuration",
        *,
        related: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message if what is None else f"{what}: {message}")
        self.key = key
        self.message = message
        # a check across keys names them all, so `load_config` can point at whichever was set
        self.keys = (key, *related)


def check_whole_number(
    key: str, value: object, low: int, high: int, what: str | None = "configuration"
) -> None:
    """Refuse (ConfigValueError naming `key`) anything but an integer in low..high; a bool is
    not one (JSON's true would otherwise count as 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigValueError(key, f"{key} must be a whole number, got {value!r}", what)
    if not low <= int(value) <= high:
        raise ConfigValueError(key, f"{key} must be in {low}..{high}, got {value}", what)


def check_finite_number(
    key: str,
    value: object,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    what: str | None = "configuration",
) -> None:
    """Refuse anything but a finite number in [low, high] ((low, high] with low_open): NaN
    passes every comparison, so ranges alone do not catch it."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
    ):
        raise ConfigValueError(key, f"{key} must be a finite number, got {value!r}", what)
    number = float(value)
    if number < low or (low_open and number == low) or number > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ConfigValueError(key, f"{key} must be in {interval}, got {number:g}", what)


def _flatten(
    table: Mapping[str, Any],
    prefix: str = "",
    table_name: str = "",
    spelled: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Table keys joined with "_", "-" read as "_". Two spellings of one setting (`tls_dir` and
    `[tls] dir`, `local_steps` and `local-steps`) are refused, naming both: otherwise the later
    one would silently win. `spelled` maps each setting to the key as written."""
    spelled = {} if spelled is None else spelled
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}".replace("-", "_")
        if isinstance(value, dict):
            inner = f"{table_name}.{key}" if table_name else key
            out.update(_flatten(value, f"{name}_", inner, spelled))
            continue
        written = f"[{table_name}] {key}" if table_name else key
        if name in spelled:
            raise InputError(f"{spelled[name]!r} and {written!r} both set {name}; keep one")
        spelled[name] = written
        out[name] = value
    return out


def _as_written(name: str, like: str) -> str:
    """Setting `name` spelled as the user wrote `like`: in the same table if it is one of that
    table's (`tls_dir` next to `[tls] directory` reads `[tls] dir`), else flat."""
    if like.startswith("[") and "] " in like:
        table = like[1 : like.index("] ")]
        prefix = table.replace(".", "_").replace("-", "_") + "_"
        if name.startswith(prefix):
            return f"[{table}] {name.removeprefix(prefix)}"
    return name


def unknown_keys_message(unknown: list[str], spelled: Mapping[str, str], fields: set[str]) -> str:
    """The unknown keys as the user wrote them (`[tls] directory`, not `tls_directory`), each
    with the setting it most likely meant."""
    written = [spelled[name] for name in unknown]
    guesses = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(fields), n=1)
        if close:
            guesses.append(
                f"{spelled[name]!r}: did you mean {_as_written(close[0], spelled[name])!r}?"
            )
    hint = f" ({'; '.join(guesses)})" if guesses else ""
    return f"unknown settings {written}{hint}; known: {sorted(fields)}"


def warn_unknown_environment(env: Mapping[str, str], env_prefix: str, fields: set[str]) -> None:
    """Log a warning for each `env_prefix*` variable that is no setting (a misspelled one would
    be ignored silently, while files and options refuse unknown keys), with the likely one."""
    known = sorted(name.upper() for name in fields)
    for var in sorted(v for v in env if v.startswith(env_prefix)):
        name = var.removeprefix(env_prefix)
        if name in known:
            continue
        # compared without the prefix, which every name shares and would make any look close
        close = difflib.get_close_matches(name, known, n=1)
        log.warning(
            "environment variable %s is not a setting and is ignored%s",
            var,
            f": did you mean {env_prefix}{close[0]}?"
            if close
            else f" (settings: {env_prefix}<NAME>)",
        )


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Turn a TOML or environment value into the field's type, or say what is wrong."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return _coerce(value, args[0], where)
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):  # a list of names
        if isinstance(value, str):  # an option or environment variable: a JSON array
            try:
                value = json.loads(value)
            except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
                value = None
            if not isinstance(value, list):
                raise InputError(f'{where}: expected a JSON array like ["China", "Japan"]')
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise InputError(f'{where}: expected a list of names like ["China", "Japan"]')
        return tuple(value)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise InputError(f"{where}: expected two numbers like [9, 90], got {value!r}")
        return tuple(_coerce(v, int, where) for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise InputError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, str) and not value.isascii():
                raise ValueError  # int() reads "٣" and "７" as digits
            return int(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise InputError(f"{where}: expected a number, got {value!r}")
        try:
            if isinstance(value, str) and not value.isascii():
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"{where}: expected a number, got {value!r}") from None
    if hint is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise InputError(f"{where}: expected a path, got {value!r}")
        if "\0" in value:  # TOML can spell it ("\u0000"); every file call would raise ValueError
            raise InputError(f"{where}: a path cannot hold a NUL character, got {value!r}")
        return Path(value).expanduser()
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {hint!r}")


MAX_THREADS = 1024  # torch CPU threads; more is a typo, not a machine

# The most a TOML config or allow-list file may hold: an allow-list of 100,000 nodes is ~10 MB.
MAX_TOML_BYTES = 16 << 20


def read_config_file(file: Path) -> dict[str, Any]:
    """The TOML document in config `file`. Read it once and pass it on: a config given as a
    pipe (`--config <(...)`, a FIFO) is empty or waits for a new writer when read again."""
    try:
        return tomllib.loads(read_input_bytes(Path(file), MAX_TOML_BYTES).decode("utf-8"))
    except InputTooLarge:
        raise InputError(
            f"{file}: more than {size_text(MAX_TOML_BYTES)}, too large for a config file"
        ) from None
    except FileNotFoundError:
        raise InputError(f"{file}: config file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{file}: cannot read config: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{file}: not valid TOML: {err}") from err
    except RecursionError:  # tomllib recurses into nested arrays and inline tables
        raise InputError(f"{file}: not valid TOML: nested too deeply") from None


def load_config(
    cls: type[T],
    file: Path | None,
    env_prefix: str,
    overrides: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    skip_tables: tuple[str, ...] = (),
    override_sources: Mapping[str, str] | None = None,
    document: Mapping[str, Any] | None = None,
) -> T:
    """Build `cls` from its defaults, the TOML `file`, `env_prefix*` variables and `overrides`
    (command-line values; None means not given). Tables in `skip_tables` are read elsewhere.
    `override_sources` names where an override was given, for messages (default: its --option).
    `document`: `file` as `read_config_file` already read it (a pipe can be read only once)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # field -> where its value came from, for error messages
    if file is not None:
        raw = read_config_file(file) if document is None else document
        spelled: dict[str, str] = {}
        try:
            flat = _flatten({k: v for k, v in raw.items() if k not in skip_tables}, spelled=spelled)
        except InputError as err:
            raise InputError(f"{file}: {err}") from None
        unknown = sorted(set(flat) - fields)
        if unknown:
            raise InputError(f"{file}: {unknown_keys_message(unknown, spelled, fields)}")
        for key, value in flat.items():
            values[key] = _coerce(value, hints[key], f"{file}: {key}")
            sources[key] = str(file)
    env = os.environ if environ is None else environ
    warn_unknown_environment(env, env_prefix, fields)
    for name in fields:
        var = env_prefix + name.upper()
        if var in env:
            values[name] = _coerce(env[var], hints[name], f"environment {var}")
            sources[name] = f"environment {var}"
    for name, value in overrides.items():
        if value is not None:
            if name not in fields:
                raise TypeError(f"override {name!r} is not a field of {cls.__name__}")
            flag = (override_sources or {}).get(name, f"--{name.replace('_', '-')}")
            values[name] = _coerce(value, hints[name], flag)
            sources[name] = flag
    try:
        return cls(**values)
    except ConfigValueError as err:
        for key in err.keys:
            if key in sources:
                raise InputError(f"{sources[key]}: {err.message}") from err
        raise
    except (TypeError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"configuration: {err}") from err


def add_config_args(
    parser: Any,
    cls: type,
    helps: Mapping[str, str],
    skip: tuple[str, ...] = (),
    hidden: tuple[str, ...] = (),
) -> None:
    """One `--field-name` option per config field (default None: not given), with its help text.

    Values are strings here and checked by `load_config`, so a bad one names its option. Fields
    in `hidden` are accepted but left out of `--help` (a command that does not use them still
    takes a sibling command's command line)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(
        "settings (each also a TOML key in --config and an environment variable)"
    )
    for name, default in defaults.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        text = helps.get(name, "")
        shown = default if not isinstance(default, tuple) else ",".join(map(str, default))
        # a help text that says its own default (e.g. "default: wait forever") keeps it
        if hints[name] is not bool and "(default:" not in text:
            text = f"{text} (default: {shown})"
        help_text = argparse.SUPPRESS if name in hidden else text
        if hints[name] is bool:
            group.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        else:
            group.add_argument(flag, default=None, metavar=name.upper(), help=help_text)


def overrides_from_args(args: Any, cls: type) -> dict[str, Any]:
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}
