"""The rules a config field declares in its annotation, for every stage's config dataclasses.

``Annotated[float, Range(gt=0)]`` is a number's range (a float must also be finite: NaN and inf
never pass), ``Annotated[str, NAME]`` a name that becomes a file, folder or MLflow name.
:func:`pipeline.runtime.config.from_dict` enforces them when a file is read, naming the file and the dotted
key; :func:`check_fields` enforces the same rules on a config built in code. The rules live here,
below ``pipeline/``, so that the preprocessing stages' configs declare theirs too.
"""

from __future__ import annotations

import functools
import math
import operator
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """The values a numeric field takes: from ``ge`` or above ``gt``, up to ``le`` or below ``lt``
    (None: no bound on that side)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def refusal(self, value: float) -> str | None:
        """What ``value`` must be, or None when it is allowed."""
        bounds = ((self.ge, operator.ge), (self.gt, operator.gt), (self.le, operator.le),
                  (self.lt, operator.lt))
        finite = not isinstance(value, float) or math.isfinite(value)
        if finite and all(bound is None or holds(value, bound) for bound, holds in bounds):
            return None
        rule = self.describe()
        return f"a finite number {rule}".strip() if isinstance(value, float) else rule

    def describe(self) -> str:
        """``>= 1``, ``> 0``, ``in [0, 1)``."""
        low = self.ge if self.ge is not None else self.gt
        high = self.le if self.le is not None else self.lt
        if low is not None and high is not None:
            return (f"in {'[' if self.ge is not None else '('}{_number(low)}, "
                    f"{_number(high)}{']' if self.le is not None else ')'}")
        if low is not None:
            return f"{'>=' if self.ge is not None else '>'} {_number(low)}"
        if high is not None:
            return f"{'<=' if self.le is not None else '<'} {_number(high)}"
        return ""


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else repr(bound)


@dataclass(frozen=True)
class Name:
    """A name that becomes a file or folder name (run, sweep, model file) or an MLflow name:
    letters, digits, '.', '_', '-', starting with a letter or digit, no '..', at most
    ``max_length`` characters; never a path separator, so it cannot leave its folder."""

    max_length: int = 128

    def refusal(self, value: str) -> str | None:
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) and ".." not in value \
                and len(value) <= self.max_length:
            return None
        return (f"a name of letters, digits, '.', '_' and '-' that starts with a letter or digit, "
                f"has no '..' and is at most {self.max_length} characters")


NAME = Name()
# Seeds go to numpy (below 2**32) as well as torch.
SEED_RANGE = Range(ge=0, lt=2**32)
AT_LEAST_1 = Range(ge=1)
POSITIVE = Range(gt=0)
NON_NEGATIVE = Range(ge=0)
PROBABILITY = Range(ge=0, le=1)
# A share of a whole, or a jitter j drawn as U[1 - j, 1 + j]: below 1 keeps the factor positive.
FRACTION = Range(ge=0, lt=1)
JPEG_QUALITY = Range(ge=1, le=100)  # OpenCV's IMWRITE_JPEG_QUALITY


def check_fields(config: Any) -> None:
    """Raise ValueError naming the first field of dataclass ``config`` (a nested config checks
    itself) whose value breaks its annotation's rule: ``n must be >= 1, got 0``. Call it from
    ``__post_init__`` so a config built in code meets the rules a config file does."""
    for name, hint in _hints(type(config)).items():
        for key, value, reason in _refusals(hint, getattr(config, name), name):
            raise ValueError(f"{key} must be {reason}, got {value!r}")


def _applies(rule: Any, value: Any) -> bool:
    """A Range checks a number, a Name a string (a wrong type is left to the type checks)."""
    if isinstance(rule, Range):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(rule, Name) and isinstance(value, str)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _refusals(hint: Any, value: Any, key: str, nullable: bool = False) -> Iterator[tuple[str, Any, str]]:
    """(key, value, what it must be) for each value under ``hint`` that breaks its rule."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        rules = (rule for rule in hint.__metadata__ if _applies(rule, value))
        for reason in filter(None, (rule.refusal(value) for rule in rules)):
            yield key, value, f"{reason}{' or null' if nullable else ''}"
    elif origin in (typing.Union, types.UnionType) and value is not None:
        options = [option for option in args if option is not type(None)]
        if len(options) == 1:
            yield from _refusals(options[0], value, key, nullable=len(args) > 1)
    elif origin is typing.Literal and value not in args:
        yield key, value, f"one of {list(args)}"
    elif origin is tuple and isinstance(value, (tuple, list)):
        element_hints = [args[0]] * len(value) if args[-1] is Ellipsis else args
        for index, (element_hint, element) in enumerate(zip(element_hints, value, strict=False)):
            yield from _refusals(element_hint, element, f"{key}[{index}]")
