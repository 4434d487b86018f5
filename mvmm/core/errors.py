"""Exceptions raised for problems with what the user gave (files, arguments, data).

Library code speaks to Python callers: an :class:`InputError`'s message starts with the Python
parameter at fault — ``"images: …"`` for a function's argument, ``"RegistrationSettings.atlas: …"``
for a settings field — and names any other parameter in backticks (```force```). The command line
(:mod:`mvmm.cli`) rewrites both into its flags (``--images``, ``--register-atlas``, ``--force``).
"""

from __future__ import annotations

import re
from typing import Optional

# "name: …" or "Owner.name: …" at the start of a message
_LEADING_PARAMETER = re.compile(r"^([A-Za-z_][\w.]*):")


class InputError(ValueError):
    """A user input cannot be used; the message names the input and what was wrong with it."""

    @property
    def parameter(self) -> Optional[str]:
        """The Python parameter the message starts with (``"images"``, ``"PairwiseSettings.metric"``), if any."""
        match = _LEADING_PARAMETER.match(str(self))
        return match.group(1) if match else None


def field_name(settings, name: str) -> str:
    """``"RegistrationSettings.atlas"``: how an error names a field of a settings object."""
    return f"{type(settings).__name__}.{name}"


def require_choice(value, choices, parameter: str) -> None:
    """Raise InputError naming ``parameter`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise InputError(f"{parameter}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def require_field_choice(settings, name: str, choices) -> None:
    """Raise InputError naming the field (``Settings.name``) when ``settings.name`` is not one of ``choices``."""
    require_choice(getattr(settings, name), choices, field_name(settings, name))


def require_positive(settings, names, strict: bool = True) -> None:
    """Raise InputError when a field of ``settings`` named in ``names`` is not > 0 (``>= 0`` if not strict)."""
    for name in names:
        value = getattr(settings, name)
        if not (value > 0 if strict else value >= 0):
            raise InputError(f"{field_name(settings, name)}: expected {'>' if strict else '>='} 0, got {value}")
