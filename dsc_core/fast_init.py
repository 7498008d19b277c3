"""A cheaper ``__init__`` for the frozen, slotted dataclasses built on every request (issue 20).

``@dataclass(frozen=True)`` writes each field in ``__init__`` with
``object.__setattr__(self, "name", value)``: a call that looks the name up on the type again
for every field.  Counted with callgrind (Python 3.11), that is ~1.6k instructions per field,
and a small request builds about 60 fields (the head, the request info, the addressing, the
envelope, the reply, the outcome): some 10% of the ASGI app's work per request.

:func:`fast_init` replaces such a class's ``__init__`` with one that stores each field
through its slot's own descriptor (``member_descriptor.__set__``, ~0.9k instructions per
field): same parameters, same defaults and default factories, same ``__post_init__``; the
instances stay frozen (``__setattr__`` still raises ``FrozenInstanceError``), and
``dataclasses.replace``, equality, hashing and pickling are the dataclass's own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

__all__ = ["fast_init"]

T = TypeVar("T")


def fast_init(cls: type[T]) -> type[T]:
    """Give the frozen, slotted dataclass ``cls`` the cheaper ``__init__`` (module doc).
    Applied over ``@dataclass(frozen=True, slots=True)``; anything else is refused, so that
    a class changed later cannot silently lose a rule of the dataclass's own ``__init__``."""
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"fast_init needs a frozen dataclass with slots: {cls.__qualname__}")
    if any(isinstance(value, dataclasses.InitVar) for value in cls.__annotations__.values()):
        raise TypeError(f"fast_init does not handle InitVar fields: {cls.__qualname__}")
    namespace: dict[str, Any] = {"_MISSING": dataclasses.MISSING}
    positional: list[str] = []
    keyword: list[str] = []
    body: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = field.name
        namespace[f"_set_{name}"] = cls.__dict__[name].__set__
        value = name
        if field.default is not dataclasses.MISSING:
            namespace[f"_default_{name}"] = field.default
            default = f"_default_{name}"
        elif field.default_factory is not dataclasses.MISSING:
            namespace[f"_factory_{name}"] = field.default_factory
            default = "_MISSING"
            value = f"_factory_{name}() if {name} is _MISSING else {name}"
        else:
            default = ""
        if not field.init:
            if default == "":
                raise TypeError(f"fast_init: {cls.__qualname__}.{name} has no value")
            value = f"_factory_{name}()" if default == "_MISSING" else default
        else:
            parameter = f"{name}={default}" if default else name
            (keyword if field.kw_only else positional).append(parameter)
        body.append(f"    _set_{name}(self, {value})")
    if hasattr(cls, "__post_init__"):
        body.append("    self.__post_init__()")
    parameters = ", ".join(["self", *positional, *(["*", *keyword] if keyword else [])])
    source = f"def __init__({parameters}):\n" + "\n".join(body or ["    pass"]) + "\n"
    exec(source, namespace)
    init = namespace["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    init.__module__ = cls.__module__
    init.__doc__ = cls.__init__.__doc__
    cls.__init__ = init  # type: ignore[method-assign]
    return cls
