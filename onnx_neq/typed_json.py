"""Dataclasses from untrusted JSON: every field checked against its type hint before it is used.

    build(Manifest, json.loads(text), where="ART/manifest.json")   ->  Manifest, or NeqError naming
                                                                        the field, its value and the fix

A file someone hands us (a manifest, a run's settings.json) is read through here, so a wrong type
(a string where a count belongs, a list where a name belongs) is one line at load time, never a
crash deep in the training loop. Numbers are checked for type only; their ranges are checked by
the owner of each file (Manifest.validate, TrainConfig.validate).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from onnx_neq.errors import NeqError

MAX_JSON_BYTES = 64 << 20  # no settings file or manifest of ours comes near this


def read_json(path: Path, fix: str, limit: int = MAX_JSON_BYTES) -> Any:
    """Parsed JSON of a file someone handed us; NeqError '<path> ...; `fix`' when it is too large,
    not text, not JSON, or nested beyond reason."""
    try:
        size = path.stat().st_size
        if not path.is_file() or size > limit:
            raise NeqError(f"{path} is not a regular file of at most {limit >> 20} MiB; {fix}")
        with open(path, "rb") as f:
            return json.loads(f.read(limit + 1).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise NeqError(f"{path} is corrupted: not valid JSON ({exc.__class__.__name__}: {str(exc)[:100]}); {fix}") from None


def build(cls: type, data: Any, where: str, fix: str, root: str = "") -> Any:
    """An instance of dataclass `cls` from `data`; NeqError '`where`: <problem>; `fix`' otherwise. A
    problem names the field by its path in the file, from `root` (e.g. config.lr)."""
    problem = _problem(cls, data, root or "the file")
    if problem is not None:
        raise NeqError(f"{where}: {problem}; {fix}")
    return _construct(cls, data)


def _problem(hint: Any, value: Any, path: str) -> str | None:
    if dataclasses.is_dataclass(hint):
        return _dataclass_problem(hint, value, path)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        problems = [_problem(arg, value, path) for arg in args]
        return None if None in problems else next(p for p in problems if p is not None)
    if origin is list:
        if not isinstance(value, list):
            return _wrong(path, value, "a list")
        return next((p for i, v in enumerate(value) if (p := _problem(args[0], v, f"{path}[{i}]"))), None)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            return _wrong(path, value, "an object")
        return next((p for k, v in value.items() if args and (p := _problem(args[1], v, f"{path}.{k}"))), None)
    return _scalar_problem(hint, value, path)


def _scalar_problem(hint: Any, value: Any, path: str) -> str | None:
    if hint is Any:
        return None
    if hint is type(None):
        return None if value is None else _wrong(path, value, "null")
    if hint is bool:
        return None if isinstance(value, bool) else _wrong(path, value, "true or false")
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _wrong(path, value, "an integer")
    if hint is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else _wrong(path, value, "a number")
    if hint is str:
        return None if isinstance(value, str) else _wrong(path, value, "a string")
    if hint is dict:
        return None if isinstance(value, dict) else _wrong(path, value, "an object")
    if hint is list:
        return None if isinstance(value, list) else _wrong(path, value, "a list")
    raise TypeError(f"typed_json cannot check {hint!r}")  # a field type this module was not taught: a bug


def _dataclass_problem(cls: type, value: Any, path: str) -> str | None:
    if not isinstance(value, dict):
        return _wrong(path, value, "an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(value) - set(fields))
    if unknown:
        return f"{path} has unknown fields {unknown[:5]}"
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in value]
    if missing:
        return f"{path} lacks fields {missing[:5]}"
    return next((p for name, v in value.items() if (p := _problem(hints[name], v, f"{path}.{name}"))), None)


def _construct(hint: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        return hint(**{name: _construct(hints[name], v) for name, v in value.items()})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        built = [a for a in args if dataclasses.is_dataclass(a) and _problem(a, value, "") is None]
        return _construct(built[0], value) if built else value
    if origin is list:
        return [_construct(args[0], v) for v in value]
    if hint is float and value is not None:
        return float(value)
    return value


def _wrong(path: str, value: Any, expected: str) -> str:
    shown = repr(value)
    return f"{path} is {shown[:40] + '...' if len(shown) > 40 else shown}, expected {expected}"
