"""Frozen-dataclass configs and the one bridge from a dataclass to argparse.

Library code takes explicit arguments or these dataclasses, never an argparse namespace; the CLI derives
its flags from the dataclass fields (`tile_overlap` -> `--tile-overlap`), so names cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

T = TypeVar("T")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, help: dict[str, str] | None = None,
                            skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of the dataclass `cls`; defaults and choices come from the fields.

    bool fields become `--flag/--no-flag`; `Literal[...]` fields become choices; tuples take several values.
    """
    hints = typing.get_type_hints(cls)
    help = help or {}
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        kw: dict[str, Any] = {"default": default, "dest": f.name, "help": help.get(f.name, f.metadata.get("help"))}
        if kw["help"] is not None:
            kw["help"] += " (default: %(default)s)"
        if tp is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
            continue
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(get_args(tp)[0])
        elif get_origin(tp) is tuple:
            inner = get_args(tp)[0]
            kw["type"] = inner
            kw["nargs"] = "+"
        elif tp in (int, float, str):
            kw["type"] = tp
        else:
            kw["type"] = str
        parser.add_argument(_flag(f.name), **kw)


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` from the parsed flags that `add_dataclass_arguments` added (tuples restored)."""
    hints = typing.get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or not hasattr(args, f.name):
            continue
        v = getattr(args, f.name)
        tp, _ = _unwrap_optional(hints[f.name])
        if get_origin(tp) is tuple and isinstance(v, list):
            v = tuple(v)
        kw[f.name] = v
    kw.update(overrides)
    return cls(**kw)


def to_json(cfg: Any) -> str:
    """The resolved config as JSON (written next to outputs and into checkpoint metadata)."""
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True, default=str)
