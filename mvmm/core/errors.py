"""Exceptions raised for problems with what the user gave (files, arguments, data)."""


class InputError(ValueError):
    """A user input cannot be used; the message names the input and what was wrong with it."""


def require_choice(value, choices, argname: str) -> None:
    """Raise InputError naming ``argname`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise InputError(f"{argname}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def require_positive(settings, names, strict: bool = True) -> None:
    """Raise InputError when an attribute of ``settings`` named in ``names`` is not > 0 (``>= 0`` if not strict).

    The message names the command-line option (``control_spacing`` → ``--control-spacing``).
    """
    for name in names:
        value = getattr(settings, name)
        if not (value > 0 if strict else value >= 0):
            raise InputError(f"--{name.replace('_', '-')}: expected {'>' if strict else '>='} 0, got {value}")
