"""Typed option values: parse ``key=value`` text and check a value against a declared type.

Shared by the training config (``train.lr=1e-4``) and method options (``-O n_tok=2``, ``method.n_tok=2``), so
both accept and refuse the same things with the same words.
"""

from __future__ import annotations

import contextlib
import logging
import re
import types
import typing
from collections.abc import Sequence
from typing import Any

import yaml

logger = logging.getLogger(__name__)


class OptionError(ValueError):
    """A value that does not fit its option; the message names the option and the expected type."""


def type_name(kind: Any) -> str:
    """``int``, ``float | None``, ``tuple[str, ...]``: a declared type as users read it."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        return " | ".join(type_name(a) for a in args)
    if args:
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{getattr(typing.get_origin(kind), '__name__', kind)}[{inner}]"
    return "None" if kind is type(None) else getattr(kind, "__name__", str(kind))


def parse_value(raw: str, kind: Any = None) -> Any:
    """Text from the command line as a YAML scalar or list (``4``, ``true``, ``[q_proj, v_proj]``, ``1e-4``); also
    ``None`` (as ``ccmem methods`` shows a default) and a fraction such as ``1/8`` (as ``--budgets`` takes one)."""
    if not raw.strip() or raw.strip() == "None":  # not "none": a method is called that
        return None
    fraction = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*", raw)
    if fraction and float(fraction[2]) != 0:
        return float(fraction[1]) / float(fraction[2])
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if _allows(kind, str) and not isinstance(value, str) and raw.strip() not in ("null", "Null", "NULL", "~"):
        return raw.strip()  # text where text is wanted: "Note: be brief" is no mapping, "# Rules" no YAML comment
    if isinstance(value, str) and _allows(kind, float):
        with contextlib.suppress(ValueError):  # YAML reads "3e-4" as a string
            value = float(value)
    return value


def parse_pairs(pairs: list[str], flag: str = "-O") -> dict[str, Any]:
    """``KEY=VALUE`` pairs from the command line as a dict, values parsed by :func:`parse_value`."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"{flag} {pair!r} must look like KEY=VALUE, e.g. {flag} n_tok=2")
        options[key.strip()] = parse_value(raw)
    say_repeated(pairs, flag)
    return options


def say_repeated(pairs: Sequence[str], flag: str) -> None:
    """Warn where one key is given two different values: the last one counts, as for any command-line flag (a
    script may append an override to a command), but a typed command rarely means both."""
    seen: dict[str, str] = {}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        key, raw = key.strip(), raw.strip()
        if key in seen and seen[key] != raw:
            logger.warning("%s %s is given twice (%s, then %s): the last one counts", flag, key, seen[key], raw)
        seen[key] = raw


def _allows(kind: Any, wanted: type) -> bool:
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    return any((typing.get_origin(a) or a) is wanted for a in allowed)


def coerce(key: str, kind: Any, value: Any) -> Any:
    """Check ``value`` against ``kind`` (ints are accepted for floats, lists for tuples, and text that reads as the
    wanted type, as :func:`parse_value` reads the command line); return it converted."""
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None:
        if type(None) in allowed:
            return None
        raise OptionError(f"{key} cannot be empty")
    if isinstance(value, str) and not _allows(kind, str):
        # text where a number, flag or list is wanted (``n_tok="3"`` from a config file or the API): read it as the
        # command line reads ``-O n_tok=3``, so every way in accepts and refuses the same things
        parsed = parse_value(value, kind)
        if parsed is not None and not isinstance(parsed, str):
            return coerce(key, kind, parsed)
    for option in allowed:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin in (list, tuple) and isinstance(value, list | tuple):
            return origin(str(v) for v in value)
        if origin is dict and isinstance(value, dict):
            value_type = (typing.get_args(option) or (str, str))[1]
            for k, v in value.items():
                if v is None and ":" in str(k):  # YAML's {a:1} is the key "a:1" with no value
                    name, _, given = str(k).partition(":")
                    raise OptionError(
                        f"{key}: {{{k}}} reads as the key {k!r} with no value; YAML needs a space after the colon: "
                        f"{{{name}: {given}}}"
                    )
            return {str(k): coerce(f"{key}.{k}", value_type, v) for k, v in value.items()}
        if origin in (str, bool) and type(value) is origin:
            return value
    hint = f" (a list: {key}=[{value}, ...])" if any(_allows(kind, t) for t in (list, tuple)) else ""
    raise OptionError(f"{key} must be {type_name(kind)}, got {value!r}{hint}")
