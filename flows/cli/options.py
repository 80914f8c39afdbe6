"""Command-line options generated from the pydantic settings, so names, choices, defaults and help
cannot drift from what the flows and the UI forms accept.

Each field becomes `--field-name` (or the flag given in `Renamed`) with the field's description and
default as help. Options left out on the command line are not passed on, so the settings' own
defaults apply; pydantic then validates the whole object, and its complaints name the flag.
"""

from __future__ import annotations

import argparse
import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic import ValidationError as SettingsError
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class Renamed:
    """A field shown under another flag, in another unit (`--max-file-mb` for `max_file_bytes`)."""

    flag: str
    metavar: str
    scale: float = 1.0
    unit: str = ""


def _plain(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def flag(name: str, renamed: dict[str, Renamed]) -> str:
    return renamed[name].flag if name in renamed else "--" + name.replace("_", "-")


def _default_text(field: FieldInfo, rename: Renamed | None) -> str:
    value = field.default
    if value is None:
        return ""
    if rename is not None and rename.scale != 1.0:
        value = value / rename.scale
        value = int(value) if float(value).is_integer() else value
        return f" (default {value}{rename.unit})"
    return f" (default {value})"


def add_settings_options(
    parser: argparse.ArgumentParser | Any,
    model: type[BaseModel],
    *,
    skip: frozenset[str] = frozenset(),
    renamed: dict[str, Renamed] | None = None,
    metavars: dict[str, str] | None = None,
) -> None:
    """One option per field of `model` (except `skip`), typed and described from the field."""
    renamed, metavars = renamed or {}, metavars or {}
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        annotation = _plain(field.annotation)
        rename = renamed.get(name)
        options: dict[str, Any] = {
            "dest": name,
            "default": None,
            "help": (field.description or field.title or name) + _default_text(field, rename),
        }
        if annotation is bool:  # a flag: given means True; absent leaves the field's default
            options.update(action="store_true")
        elif get_origin(annotation) is Literal:
            choices = list(get_args(annotation))
            options.update(type=type(choices[0]), choices=choices)
        elif annotation in (int, float):
            options.update(
                type=float if rename is not None else annotation,
                metavar=rename.metavar if rename else metavars.get(name, "N" if annotation is int else "X"),
            )
        else:
            options.update(metavar=metavars.get(name, name.upper()))
        parser.add_argument(flag(name, renamed), **options)


def settings_from(
    args: argparse.Namespace, model: type[BaseModel], *, renamed: dict[str, Renamed] | None = None, **fixed: Any
) -> Any:
    """Build `model` from the options the user gave (plus `fixed` values); pydantic validates it."""
    renamed = renamed or {}
    values: dict[str, Any] = dict(fixed)
    for name in model.model_fields:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name in renamed and renamed[name].scale != 1.0:
            value = int(value * renamed[name].scale)
        values[name] = value
    return model(**values)


def settings_message(exc: SettingsError, renamed: dict[str, Renamed] | None = None) -> str:
    """pydantic's complaints, each naming the option to change."""
    renamed = renamed or {}
    parts = []
    for error in exc.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        # A rule about several options at once (the model's own validator) has no single field to name.
        parts.append(f"{flag(str(error['loc'][0]), renamed)}: {message}" if error["loc"] else message)
    return "; ".join(parts)
