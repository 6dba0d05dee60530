"""The method registry: name → method class. ``attach`` looks methods up here."""

from __future__ import annotations

import inspect
from typing import Callable

_METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable:
    """Register a tuning method under ``name``, usable as ``petune.attach(model, name, **options)``.

    Decorates either a subclass of :class:`petune.Method` (full control: one module per task,
    task switching, encoder states) or a plain function ``fn(model, **options)`` that makes some
    parameters trainable or adds new ones (a single module shared by all tasks). petune freezes
    every base parameter before calling the function; whatever has ``requires_grad=True``
    afterwards is the method's.

    Raises:
        ValueError: ``name`` is empty or already registered.
        TypeError: the decorated object is neither a Method subclass nor a function.
    """
    from .base import FunctionMethod, Method

    if not isinstance(name, str) or not name:
        raise ValueError("register_method needs a non-empty method name, e.g. @register_method('bitfit')")

    def decorate(obj):
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered ({_METHODS[name].__name__}); pick another name")
        if inspect.isclass(obj) and issubclass(obj, Method):
            cls = obj
        elif inspect.isfunction(obj):
            cls = type(f"{obj.__name__}_method", (FunctionMethod,), {"function": staticmethod(obj)})
        else:
            raise TypeError(f"@register_method({name!r}) decorates a petune.Method subclass or a function, not {obj!r}")
        cls.name = name
        _METHODS[name] = cls
        return obj

    return decorate


def methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_METHODS)


def get_method(name: str) -> type:
    """The method class registered as ``name``.

    Raises:
        ValueError: unknown name; the message lists the registered ones.
    """
    try:
        return _METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(methods())}") from None
