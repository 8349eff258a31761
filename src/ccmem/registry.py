"""Method name -> class. Everything else looks methods up here, so a new method is one file plus one line."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from ccmem.methods.base import Method
from ccmem.methods.ccm import CCMConcat, CCMMerge
from ccmem.methods.full import FullContext, NoContext
from ccmem.methods.gist import Gist

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (FullContext, NoContext, CCMConcat, CCMMerge, Gist)}


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
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"method {name!r} has no option {key!r}{hint}; its options are: {', '.join(valid) or 'none'}"
            )
    return cls(**options)
