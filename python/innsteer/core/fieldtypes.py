"""Field types of the configuration dataclasses, checked at run time: options arrive from JSON
(``innsteer tune --variants``) and keyword arguments, where 2.5 couplings or ``"64"`` hidden units
would otherwise fail deep inside training, or ``True`` pass as 1."""

from __future__ import annotations

import numbers
from typing import get_args, get_type_hints

from .errors import ConfigError

# the declared type -> (what a value must be, how the error names it); a bool is never a number here
_KINDS = {
    int: (numbers.Integral, "an integer"),
    float: (numbers.Real, "a number"),
    str: (str, "a string"),
}


def check_field_types(config) -> None:
    """ConfigError naming the first field of the dataclass ``config`` whose value is not of its
    declared type (int, float, str, or Optional of one; nested dataclasses check themselves)."""
    for name, hint in get_type_hints(type(config)).items():
        value = getattr(config, name)
        args = get_args(hint)
        if type(None) in args:
            if value is None:
                continue
            hint = next(arg for arg in args if arg is not type(None))
        if hint not in _KINDS:
            continue
        kind, what = _KINDS[hint]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ConfigError(f"{name} must be {what}, got {value!r}")
