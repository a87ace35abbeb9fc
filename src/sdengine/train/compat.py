"""Old keyword names of renamed training settings, still accepted so that code and scripts written against
earlier releases keep working (``empty_prompt_p``, ``label_dropout`` and ``caption_dropout`` are now all
``cond_dropout``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import UsageError

T = TypeVar("T", bound=type)


def renamed_fields(**old_to_new: str) -> Callable[[T], T]:
    """Class decorator for a dataclass: ``__init__`` also takes each old keyword, and reading the old attribute
    gives the new one. Giving both names is a UsageError (which one was meant is unknowable)."""

    def wrap(cls: T) -> T:
        init = cls.__init__  # type: ignore[misc]

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise UsageError(f"{cls.__name__}: give {new} or its old name {old}, not both")
                    kwargs[new] = kwargs.pop(old)
            init(self, *args, **kwargs)

        cls.__init__ = __init__  # type: ignore[misc]
        for old, new in old_to_new.items():
            setattr(cls, old, property(lambda self, _new=new: getattr(self, _new), doc=f"old name of {new}"))
        return cls

    return wrap


__all__ = ["renamed_fields"]
