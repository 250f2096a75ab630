"""Typed command-line overrides and JSON round trips for nested frozen-dataclass configs.

Every command builds its configuration as a frozen dataclass whose fields are scalars (``int``,
``float``, ``bool``, ``str``, ``Literal``, ``X | None``), tuples of scalars or nested config
dataclasses. This module gives them one command-line grammar (the torchtitan/tyro style of
``--section.field=value``) and one file format (the JSON written into every run directory):

    config, rest = resolve_config(PretrainConfig(), sys.argv[1:])
    # --config run/config.json        start from a saved config instead of the default
    # --train.lr=3e-4 --model.hidden_size 256 --train.betas=0.9,0.98   typed overrides
    # --output runs/x                 a field of the config itself: --field=value
    # --data shards/a,shards/b        an alias of ALIASES: exactly --data.data=shards/a,shards/b

Values are converted with the field's annotation and checked: a wrong type, an unknown field (with
the closest names suggested) or a value outside a ``Literal`` raises ``ConfigError`` naming the
dotted field. ``dataclasses.replace`` re-runs each dataclass's ``__post_init__`` validation.

Ranges. Every numeric field declares its allowed values where it is defined, ``option(32, "...",
ge=1)`` (``ge``/``gt``/``le``/``lt``; for a tuple, each item), and optionally a ``check`` (a
function that raises ``ValueError`` for a bad value, such as ``output_dir``). ``describe`` prints
them in ``--help``; each config's ``__post_init__`` calls ``check_fields(self)`` first and then
its cross-field rules (``field_error``), so a config built in code, from the command line or from a
saved ``config.json`` is checked before any work, with one line that names the field, the value and
the range: ``--data.batch_size: 0 is not allowed (must be >= 1)``.

(Over 500 lines because the grammar, the type conversion, the range checks and the JSON round trip
share one walk over annotated dataclass fields; split, each half would re-implement it.)
"""

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from lub_fast.errors import UsageError

T = TypeVar("T")

# The short spellings the README documents, shared by every command whose config has the field;
# each is exactly the field it names (same value syntax, same checks).
ALIASES = {
    "--data": "data.data",
    "--init-from": "init_from",
    "--cache-teacher": "cache_teacher",
    "--from-cache": "from_cache",
}
_ALIAS_OF = {path: alias for alias, path in ALIASES.items()}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null")


class ConfigError(UsageError, ValueError):
    """A config file, override or value that does not match the config's fields, types and ranges.

    ``field``: the dotted field the error is about (None: the whole config). ``owner``: the config
    class that raised it, while the field's place in a command's config is not known yet; the
    message then names ``Owner.field``, and ``placed(prefix)`` (applied by ``from_dict`` and the
    overrides) turns it into the option ``--prefix.field``.
    """

    def __init__(self, message: str, *, field: str | None = None, owner: str | None = None):
        self.detail, self.field, self.owner = message, field, owner
        where = f"{owner}.{field}" if owner else f"--{field}" if field else None
        super().__init__(f"{where}: {message}" if where else message)

    def placed(self, prefix: str) -> "ConfigError":
        """This error named as the option ``--{prefix}{field}`` (unchanged when already placed)."""
        if self.owner is None or self.field is None:
            return self
        return ConfigError(self.detail, field=f"{prefix}{self.field}")


_BOUNDS = ("ge", "gt", "le", "lt")


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    check: Any = None,
    flag: str | None = None,
) -> Any:
    """A dataclass field with a default, the help text that ``describe`` prints and its allowed
    values: ``ge``/``gt``/``le``/``lt`` bounds (each item of a tuple; ``None`` always allowed for an
    ``X | None`` field) and ``check(value)``, a function that raises ``ValueError`` for a bad
    value. ``flag``: the command-line option that sets the field when it is neither ``--FIELD``
    nor in ``ALIASES`` (messages name it). ``check_fields`` enforces them."""
    metadata = {"help": help}
    for name, bound in zip(_BOUNDS, (ge, gt, le, lt)):
        if bound is not None:
            metadata[name] = bound
    if check is not None:
        metadata["check"] = check
    if flag is not None:
        metadata["flag"] = flag
    return dataclasses.field(default=default, metadata=metadata)


def range_text(bounds: Mapping[str, Any]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``"in [0, 1)"``, ``{"ge": 1}`` -> ``">= 1"``; ``""`` without bounds."""
    low = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    high = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _value_problem(value: Any, rules: Mapping[str, Any]) -> str | None:
    """Why ``value`` breaks ``rules`` (the bounds and ``check`` of ``option``); None when it does not."""
    if value is None:
        return None
    if "check" in rules:
        try:
            rules["check"](value)
        except ValueError as error:
            return str(error)
    return _bounds_problem(value, rules)


def _bounds_problem(value: Any, bounds: Mapping[str, Any]) -> str | None:
    if isinstance(value, (bool, str)):
        return None
    if isinstance(value, (tuple, list)):
        return next((p for p in (_bounds_problem(v, bounds) for v in value) if p), None)
    if not isinstance(value, (int, float)):
        return None
    rule = range_text(bounds)
    finite = not isinstance(value, float) or math.isfinite(value)
    inside = (
        finite
        and ("ge" not in bounds or value >= bounds["ge"])
        and ("gt" not in bounds or value > bounds["gt"])
        and ("le" not in bounds or value <= bounds["le"])
        and ("lt" not in bounds or value < bounds["lt"])
    )
    if inside:
        return None
    if not finite:
        rule = f"finite and {rule}" if rule else "finite"
    return f"{value!r} is not allowed (must be {rule})"


def check_value(name: str, value: Any, **rules: Any) -> None:
    """Raise ``ConfigError`` naming the option ``--name`` when ``value`` breaks ``rules`` (``ge``,
    ``gt``, ``le``, ``lt``, ``check``, as in ``option``): the ranges of command-line options that
    are not config fields. ``None`` is always allowed."""
    problem = _value_problem(value, rules)
    if problem is not None:
        raise ConfigError(problem, field=name)


def check_fields(config: Any, *, command: bool = False) -> None:
    """Raise ``ConfigError`` for the first field of the dataclass ``config`` whose value breaks its
    declared bounds or check (nested configs check themselves). ``command``: ``config`` is a
    command's whole config, so its fields are named as the options ``--field``."""
    owner = None if command else type(config).__name__
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            continue
        problem = _value_problem(value, f.metadata)
        if problem is not None:
            if "flag" in f.metadata:
                raise ConfigError(problem, field=f.metadata["flag"].removeprefix("--"))
            raise ConfigError(problem, field=_option_name(f.name) if command else f.name, owner=owner)


def field_error(config: Any, name: str, rule: str, *, command: bool = False) -> ConfigError:
    """The ``ConfigError`` of a cross-field rule: field ``name`` (dotted for a nested field) of
    ``config`` has a value that is not allowed; ``rule`` completes "must be ...". ``command`` as in
    ``check_fields``."""
    value = config
    for part in name.split("."):
        value = getattr(value, part)
    message = f"{value!r} is not allowed (must be {rule})"
    flag = next((f.metadata.get("flag") for f in dataclasses.fields(config) if f.name == name), None)
    if flag is not None:
        return ConfigError(message, field=flag.removeprefix("--"))
    if command:
        return ConfigError(message, field=_option_name(name))
    return ConfigError(message, field=name, owner=type(config).__name__)


def _option_name(path: str) -> str:
    """The option that sets the top-level field or dotted field ``path``, without its ``--``: the
    alias of a top-level field, else the path."""
    return _ALIAS_OF[path].removeprefix("--") if path in _ALIAS_OF and "." not in path else path


def output_dir(path: str) -> None:
    """A ``check`` for a directory that a command creates or reuses: not an existing file."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path} is an existing file, not a directory: choose another path")


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
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.placed(where) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{where.rstrip('.') or cls.__name__}: {error}") from None


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
    """Return ``config`` with each ``"section.field=value"`` (a leading ``--`` is allowed) applied;
    a later value of a field wins. All fields of a section change in one ``dataclasses.replace``,
    so cross-field rules (``warmup_steps <= total_steps``) see the new values together, whatever
    their order on the command line."""
    tree: dict = {}
    for item in overrides:
        key, sep, text = item.removeprefix("--").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        node = tree
        *sections, name = key.split(".")
        for part in sections:
            node = node[part] if isinstance(node.get(part), dict) else node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is set as a value and as a section")
        node[name] = (key, text)
    return _apply(config, tree, "")


def _apply(config: Any, tree: dict, prefix: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(config) if f.init}
    hints = typing.get_type_hints(type(config))
    changes, given = {}, []
    for head, item in tree.items():
        if head not in fields:
            full = item[0] if isinstance(item, tuple) else f"{prefix}{head}"
            raise ConfigError(_unknown(full, head, list(fields)))
        if isinstance(item, tuple):
            key, text = item
            changes[head] = parse_value(text, hints[head], key)
            given.append(f"--{key}={text}")
            continue
        child = getattr(config, head)
        if not dataclasses.is_dataclass(child):
            key = next(iter(_leaves(item)))
            raise ConfigError(f"{key}: {head} is a {_type_name(hints[head])} field, not a section")
        changes[head] = _apply(child, item, f"{prefix}{head}.")
        given.extend(f"--{key}={text}" for key, text in _leaves(item).items())
    try:
        return dataclasses.replace(config, **changes)
    except ConfigError as error:
        raise error.placed(prefix) from None
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{' '.join(given)}: {error}") from error


def _leaves(tree: dict) -> dict[str, str]:
    """``{dotted key: text}`` of the overrides below a section of ``apply_overrides``' tree."""
    found = {}
    for item in tree.values():
        found.update({item[0]: item[1]} if isinstance(item, tuple) else _leaves(item))
    return found


def split_overrides(argv: Sequence[str], names: Mapping[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Separate overrides from the other arguments.

    ``--a.b=value`` and ``--a.b value`` become ``"a.b=value"``, and so does ``--x value`` for each
    option ``--x`` that ``names`` maps to the field path ``a.b``; every other argument is returned
    untouched, in order, for the command's own ``argparse`` parser.
    """
    names = names or {}
    overrides, rest = [], []
    argv = list(argv)
    i = 0
    while i < len(argv):
        arg = argv[i]
        option, sep, text = arg.partition("=")
        key = names.get(option, option[2:])
        if arg.startswith("--") and ("." in key or option in names):
            if sep:
                overrides.append(f"{key}={text}")
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
    overrides applied in order: ``--section.field=value``, ``--field=value`` for a field of the
    config itself, and the ``ALIASES`` of fields the config has (``--a.b value`` and ``--a value``
    take the next argument). Returns the config and the arguments left for the command."""
    top = {f.name for f in dataclasses.fields(default) if f.init and not dataclasses.is_dataclass(getattr(default, f.name))}
    aliases = {alias: path for alias, path in ALIASES.items() if _has_field(default, path)}
    fields = [f"--{name}" for name in top]
    overrides, rest = split_overrides(argv, {**dict(zip(fields, (f[2:] for f in fields))), **aliases})
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


def _has_field(config: Any, path: str) -> bool:
    for part in path.split("."):
        if not dataclasses.is_dataclass(config) or part not in {f.name for f in dataclasses.fields(config)}:
            return False
        config = getattr(config, part)
    return True


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
        allowed = range_text(f.metadata)
        path = f"{prefix}{f.name}"
        alias = _ALIAS_OF.get(path)
        name = alias if alias and not prefix else f"--{path}"
        lines.append(
            f"{name}={_type_name(hints[f.name])} (default: {shown})"
            + (f" {allowed}" if allowed else "")
            + (f"  {help_text}" if help_text else "")
            + (f" (short: {alias})" if alias and prefix else "")
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
