"""Method name -> class. Methods register themselves with :func:`register`; everything else looks them up here.

A new method is one file in ``ccmem/methods/`` with ``@register`` on its dataclass, plus its import in
``ccmem/methods/__init__.py`` and one line in the contract tests' case list (``tests/methods/cases.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import TYPE_CHECKING, Any, TypeVar

from ccmem.options import OptionError, coerce

if TYPE_CHECKING:
    from ccmem.methods.base import Method

M = TypeVar("M", bound="type[Method]")

#: Every registered method, filled as ``ccmem.methods`` is imported (use :func:`method_classes`).
METHODS: dict[str, type[Method]] = {}
#: The method ``ccmem.load``, ``ccmem chat`` and ``ccmem train`` use when none is named.
DEFAULT_METHOD = "ccm-concat"


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


def register(cls: M) -> M:
    """Class decorator: make a method dataclass available under its ``name``."""
    from ccmem.methods.base import KINDS

    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} must be a dataclass (its fields are its options)")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name`")
    if METHODS.get(name, cls) is not cls:
        raise ValueError(f"method name {name!r} is taken by {METHODS[name].__name__}")
    if cls.kind not in KINDS:
        raise ValueError(f"{cls.__name__}.kind must be one of {KINDS}, got {cls.kind!r}")
    METHODS[name] = cls
    return cls


def method_classes() -> dict[str, type[Method]]:
    """Every registered method by name, baselines first, then learned, then training-free methods.

    The built-in methods are registered when the ``ccmem`` package is imported (it imports ``ccmem.methods``),
    which happens before any of its modules, this one included, can be used.
    """
    from ccmem.methods.base import KINDS

    order = list(METHODS)
    return dict(sorted(METHODS.items(), key=lambda item: (KINDS.index(item[1].kind), order.index(item[0]))))


def method_names() -> list[str]:
    return list(method_classes())


def method_class(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names list the valid ones."""
    methods = method_classes()
    if not isinstance(name, str):
        raise UnknownMethodError(f"a method is given by its name, not {name!r}; valid methods: {', '.join(methods)}")
    try:
        return methods[name]
    except KeyError:
        lowered = {m.lower(): m for m in methods}  # method names are lower case: 'CCM-CONCAT' means 'ccm-concat'
        close = [lowered[name.lower()]] if name.lower() in lowered else difflib.get_close_matches(name, methods, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownMethodError(f"unknown method {name!r}{hint}; valid methods: {', '.join(methods)}") from None


def check_options(name: str, options: dict[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """``options`` checked against method ``name``'s declared options: names (closest valid one suggested) and
    types (lists become tuples where a tuple is declared); returns them converted."""
    cls = method_class(name)
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    offered = [v for v in valid if v not in cls.unsupported_options]  # the others are refused by the method itself
    out = {}
    for key, value in options.items():
        if key not in valid:
            close = difflib.get_close_matches(key, offered, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionError(
                f"method {name!r} has no option {key!r}{hint}; its options are: {', '.join(offered) or 'none'}"
            )
        out[key] = coerce(prefix + key, hints[key], value)
    return out


def get_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with its options; unknown names and options are refused with the valid ones."""
    return method_class(name)(**check_options(name, options))
