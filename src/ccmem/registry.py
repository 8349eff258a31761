"""Method name -> class. Everything else looks methods up here, so a new method is one file plus one line."""

from __future__ import annotations

from typing import Any

from ccmem.methods.base import Method
from ccmem.methods.ccm import CCMConcat, CCMMerge
from ccmem.methods.full import FullContext, NoContext
from ccmem.methods.gist import Gist

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (FullContext, NoContext, CCMConcat, CCMMerge, Gist)
}


class UnknownMethodError(ValueError):
    """A method name that is not registered."""


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str, **options: Any) -> Method:
    """Instantiate method ``name`` with its hyper-parameters; unknown names list the valid ones."""
    try:
        cls = METHODS[name]
    except KeyError:
        raise UnknownMethodError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}") from None
    try:
        return cls(**options)
    except TypeError as err:
        fields = [f for f in getattr(cls, "__dataclass_fields__", {}) if not f.startswith("_")]
        raise ValueError(
            f"bad option for method {name!r} ({err}); its options are: {', '.join(fields) or 'none'}"
        ) from None
