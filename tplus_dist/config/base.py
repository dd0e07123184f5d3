"""Typed, strict configuration sections.

Every section is a dataclass. Loading is strict: an unknown key, a wrong type or a value outside
its Literal is a `ConfigError` that names the field (``model.n_kv_heads``) and the reason. Each
section validates itself in ``validate()``; cross-section checks live in ``RunConfig.validate``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong. The message names the field and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}" if field else reason)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Check (and lightly coerce: int -> float, list -> tuple) ``value`` against the type ``tp``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(field, f"must be one of {_type_name(tp)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(field, f"must be {_type_name(tp)}, got null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(field, f"must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, typing.cast(type, tp)):
            return value
        if not isinstance(value, dict):
            raise ConfigError(field, f"must be a mapping (section), got {value!r}")
        return from_dict(typing.cast(type, tp), value, field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(field, f"must be a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(field, f"must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=False)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(field, f"must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(field, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(field, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(field, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(field, f"must be a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(field, f"must be {_type_name(tp)}, got {value!r}")
    return value


RENAMED = {
    "train.eval_batches": "train.eval_samples, a number of samples (micro-batches made the validation set depend on "
    "micro_batch_size); leave it out to evaluate on the whole validation split",
}
"""Keys that were replaced: their error says by what."""


def without_renamed(data: dict[str, Any]) -> dict[str, Any]:
    """A saved config (a checkpoint's manifest, run.json) without the keys :data:`RENAMED` lists: what they set
    describes how an older version ran (e.g. its validation set), not the model or state a checkpoint holds, so
    exporting or resuming that checkpoint reads the config without them; fields added since take their defaults."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key in RENAMED:
        section, _, name = key.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types are errors naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(prefix, f"must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(typing.cast(Any, cls)) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        if where in RENAMED:
            raise ConfigError(where, f"was replaced by {RENAMED[where]}")
        raise ConfigError(
            where, f"unknown key; valid keys of {prefix or 'the config'} are: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]}" if prefix else missing[0], "is required")
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain YAML-serialisable form of a (nested) dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check(cond: bool, field: str, reason: str) -> None:
    """Raise ConfigError(field, reason) unless ``cond``; reads like the rule it enforces."""
    if not cond:
        raise ConfigError(field, reason)


def is_set(obj: Any, name: str) -> bool:
    """Whether field ``name`` of the dataclass ``obj`` holds another value than its declared default: a value that a
    file, a preset or an override gave it (the default itself cannot be told from "not given", and is accepted)."""
    f = {f.name: f for f in dataclasses.fields(obj)}[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return bool(getattr(obj, name) != default)


def check_unused(
    obj: Any, prefix: str, names: tuple[str, ...] | list[str], reason: str, off: tuple[Any, ...] = ()
) -> None:
    """Refuse a setting that has no effect under the others: raise ConfigError naming the first of ``names`` that
    :func:`is_set`, with its value and ``reason`` (why nothing reads it, and what takes effect instead). A setting
    accepted and then silently ignored is a wrong result that looks right; a default is never refused, so presets
    and partial configs still load. Values in ``off`` (e.g. 0: "none of it") are accepted too, so that an override
    can switch off what a file set."""
    for name in names:
        if is_set(obj, name) and getattr(obj, name) not in off:
            value = to_dict(getattr(obj, name))
            shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
            raise ConfigError(f"{prefix}.{name}", f"({shown}) has no effect: {reason}")
