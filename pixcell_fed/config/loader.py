"""One loader for every YAML config: nested frozen dataclasses, unknown keys and wrong types rejected.

Errors name the file, the dotted key and the fix, e.g.::

    configs/site.yaml: unknown key 'tiling.tisue_fraction' (did you mean 'tissue_fraction'?);
    valid keys here: target_mpp, tile_size, tissue_fraction, ...
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypeVar, get_args, get_origin, get_type_hints

from pixcell_fed.errors import ConfigError


class DataclassInstance(Protocol):
    """Any dataclass (typeshed's private ``_typeshed.DataclassInstance``, which exists only for type checkers)."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]


T = TypeVar("T", bound=DataclassInstance)

_MISSING_HINT = "see configs/site.example.yaml, which documents every key"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(source: str, key: str, what: str, fix: str) -> ConfigError:
    where = f"{source}: " if source else ""
    return ConfigError(f"{where}{what} at key '{key}'", hint=fix)


def _convert(value: Any, tp: Any, key: str, source: str, base_dir: Path | None) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, source, base_dir)
            except ConfigError as exc:
                errors.append(exc)
        raise _fail(source, key, f"expected {_type_name(tp)}, got {value!r}", f"set '{key}' to {_type_name(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        raise _fail(source, key, f"invalid value {value!r}", f"choose one of {choices}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _fail(
                source, key, f"expected a mapping, got {type(value).__name__}", f"write '{key}:' as a mapping of keys"
            )
        return build_dataclass(tp, value, source=source, prefix=key, base_dir=base_dir)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _fail(source, key, f"expected a list, got {value!r}", f"write '{key}' as a YAML list")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]", source, base_dir) for i, v in enumerate(value))
    if origin in (dict, typing.Mapping, collections.abc.Mapping):
        if not isinstance(value, dict):
            raise _fail(source, key, f"expected a mapping, got {value!r}", f"write '{key}' as a YAML mapping")
        ktp, vtp = get_args(tp) or (Any, Any)
        return types.MappingProxyType(
            {
                _convert(k, ktp, key, source, base_dir): _convert(v, vtp, f"{key}.{k}", source, base_dir)
                for k, v in value.items()
            }
        )
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise _fail(source, key, f"expected a path, got {value!r}", f"set '{key}' to a file or folder path")
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return path
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, key, f"expected true or false, got {value!r}", f"set '{key}' to true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(source, key, f"expected an integer, got {value!r}", f"set '{key}' to a whole number")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(source, key, f"expected a number, got {value!r}", f"set '{key}' to a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(source, key, f"expected a string, got {value!r}", f"quote the value of '{key}'")
    raise _fail(source, key, f"unsupported type {tp!r}", "report this as a bug in pixcell-fed")


def build_dataclass(
    cls: type[T], data: dict[str, Any], *, source: str = "", prefix: str = "", base_dir: Path | None = None
) -> T:
    """Build the frozen dataclass ``cls`` from a plain mapping, validating every key and type.

    Relative paths are resolved against ``base_dir`` (the config file's folder) when given.
    """
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            guess = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(
                source,
                dotted,
                f"unknown key{guess}",
                f"remove or rename it; valid keys{' under ' + repr(prefix) if prefix else ''}: {', '.join(fields)}",
            )
        kwargs[key] = _convert(value, hints[key], dotted, source, base_dir)
    for name, field in fields.items():
        if name in kwargs:
            continue
        if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            dotted = f"{prefix}.{name}" if prefix else name
            raise _fail(
                source, dotted, "missing required value", f"add '{dotted}' ({_type_name(hints[name])}); {_MISSING_HINT}"
            )
        default: Any = field.default
        if field.default_factory is not dataclasses.MISSING:  # a field has a default or a factory, never both
            default = field.default_factory()
        if dataclasses.is_dataclass(default) and not isinstance(default, type) and base_dir is not None:
            default = build_dataclass(
                type(default), {}, source=source, prefix=f"{prefix}.{name}" if prefix else name, base_dir=base_dir
            )
        if isinstance(default, Path) and base_dir is not None and not default.is_absolute():
            default = base_dir / default
        kwargs[name] = default
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ range checks
        raise ConfigError(f"{source + ': ' if source else ''}{exc}", hint=_MISSING_HINT) from exc


def load_yaml_config(path: str | Path, cls: type[T]) -> T:
    """Read a YAML file into ``cls``; relative paths in it are taken relative to the file's folder."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file not found: {path}", hint="pass --config with an existing YAML file, or run 'site-agent init'"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})", hint="fix the YAML syntax at the line shown") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections", hint=_MISSING_HINT)
    return build_dataclass(cls, data, source=str(path), base_dir=path.parent.resolve())


def to_plain(obj: Any) -> Any:
    """A config object as plain YAML/JSON-friendly data (for saving the resolved config beside outputs)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (types.MappingProxyType, dict)):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
