"""Typed command-line overrides and JSON round trips for nested frozen-dataclass configs.

Every command builds its configuration as a frozen dataclass whose fields are scalars (``int``,
``float``, ``bool``, ``str``, ``Literal``, ``X | None``), tuples of scalars or nested config
dataclasses. This module gives them one command-line grammar (the torchtitan/tyro style of
``--section.field=value``) and one file format (the JSON written into every run directory):

    config, rest = resolve_config(PretrainConfig(), sys.argv[1:])
    # --config run/config.json        start from a saved config instead of the default
    # --train.lr=3e-4 --model.hidden_size 256 --train.betas=0.9,0.98   typed overrides

Values are converted with the field's annotation and checked: a wrong type, an unknown field (with
the closest names suggested) or a value outside a ``Literal`` raises ``ConfigError`` naming the
dotted field. ``dataclasses.replace`` re-runs each dataclass's ``__post_init__`` validation.
"""

import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from lub_fast.errors import UsageError

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


class ConfigError(UsageError, ValueError):
    """A config file or override that does not match the config's fields and types."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and the help text that ``describe`` prints."""
    return dataclasses.field(default=default, metadata={"help": help})


def to_dict(config: Any) -> dict[str, Any]:
    """Nested dataclass -> JSON-ready dict (tuples become lists)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(config).__name__}")
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a dict such as ``to_dict`` writes, checking every value's type.

    Missing fields take their defaults (so configs saved before a field was added still load);
    unknown fields raise ``ConfigError``. ``where`` prefixes field names in messages.
    """
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(_unknown(f"{where}{key}", key, names))
        kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    """Check/convert a JSON value for a field annotated ``annotation``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        return from_dict(annotation, value, where=f"{name}.")
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{name}: None is not allowed (type {_type_name(annotation)})")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list for {_type_name(annotation)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)} ({value!r})")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{name}: unsupported field type {_type_name(annotation)}")
    raise ConfigError(f"{name}: expected {_type_name(annotation)}, got {value!r}")


def parse_value(text: str, annotation: Any, name: str) -> Any:
    """Command-line text -> a value of type ``annotation`` (the field ``name`` is for messages).

    bool: true/false/yes/no/on/off/1/0; ``X | None``: none/null; tuples: comma-separated items
    or a JSON list; everything else as its Python constructor reads it.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        names = ", ".join(f"--{name}.{f.name}" for f in dataclasses.fields(annotation))
        raise ConfigError(f"{name} is a config section: set its fields ({names})")
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in _NONE and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(text, arg, name)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(f"{name}: {text!r} is not one of {[str(a) for a in args]}")
    if origin is tuple:
        stripped = text.strip()
        if stripped.startswith("["):
            try:
                items = json.loads(stripped)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{name}: {text!r} is not a JSON list ({error})") from None
            return _coerce(items, annotation, name)
        parts = [p.strip() for p in stripped.split(",")] if stripped else []
        item_types = [args[0]] * len(parts) if args[-1] is Ellipsis else list(args)
        if len(parts) != len(item_types):
            raise ConfigError(f"{name}: expected {len(item_types)} comma-separated items, got {text!r}")
        return tuple(parse_value(p, a, f"{name}[{i}]") for i, (p, a) in enumerate(zip(parts, item_types)))
    if annotation is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{name}: {text!r} is not a boolean (true/false)")
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ConfigError(f"{name}: {text!r} is not {_type_name(annotation)}") from None
    if annotation is str:
        return text
    raise ConfigError(f"{name}: unsupported field type {_type_name(annotation)}")


def apply_overrides(config: T, overrides: Sequence[str]) -> T:
    """Return ``config`` with each ``"section.field=value"`` (a leading ``--`` is allowed) applied."""
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        config = _replace_path(config, key.split("."), text, key)
    return config


def _replace_path(config: Any, path: list[str], text: str, full: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    head = path[0]
    if head not in fields:
        raise ConfigError(_unknown(full, head, list(fields)))
    annotation = typing.get_type_hints(type(config))[head]
    if len(path) == 1:
        value = parse_value(text, annotation, full)
    else:
        child = getattr(config, head)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{full}: {head} is a {_type_name(annotation)} field, not a section")
        value = _replace_path(child, path[1:], text, full)
    try:
        return dataclasses.replace(config, **{head: value})
    except (ValueError, TypeError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"--{full}={text}: {error}") from error


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate dotted overrides from the other arguments.

    ``--a.b=value`` and ``--a.b value`` become ``"a.b=value"``; every other argument is returned
    untouched, in order, for the command's own ``argparse`` parser.
    """
    overrides, rest = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:].partition("=")[0]
        if arg.startswith("--") and "." in key:
            if "=" in arg:
                overrides.append(arg[2:])
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                raise ConfigError(f"{arg} needs a value: {arg}=VALUE")
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Write ``to_dict(config)`` as indented JSON, atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(to_dict(config), indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_config(cls: type[T], path: str | os.PathLike) -> T:
    """Read a JSON config written by ``save_config`` into ``cls`` (types checked)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read config {path}: {error}") from None
    try:
        return from_dict(cls, data)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def resolve_config(default: T, argv: Sequence[str]) -> tuple[T, list[str]]:
    """The command-line config: ``default`` (or the file named by ``--config PATH``) with the
    dotted overrides applied. Returns the config and the arguments left for the command."""
    overrides, rest = split_overrides(argv)
    config, remaining = default, []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                path = arg.partition("=")[2]
            elif i + 1 < len(rest):
                path = rest[i + 1]
                i += 1
            else:
                raise ConfigError("--config needs a path: --config run/config.json")
            config = load_config(type(default), path)
        else:
            remaining.append(arg)
        i += 1
    return apply_overrides(config, overrides), remaining


def describe(config: Any, prefix: str = "") -> list[str]:
    """One line per overridable field: ``--section.field=TYPE (default: value) help``."""
    lines = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            lines.extend(describe(value, f"{prefix}{f.name}."))
            continue
        shown = ",".join(str(v) for v in value) if isinstance(value, tuple) else value
        help_text = f.metadata.get("help", "")
        lines.append(
            f"--{prefix}{f.name}={_type_name(hints[f.name])} (default: {shown})"
            + (f"  {help_text}" if help_text else "")
        )
    return lines


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin in (typing.Union, types.UnionType):
        return "|".join("none" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation)).upper()


def _unknown(full: str, key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; fields: {', '.join(names)}"
    return f"unknown config field {full!r}{hint}"
