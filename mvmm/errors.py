"""Exceptions raised for problems with what the user gave (files, arguments, data)."""


class InputError(ValueError):
    """A user input cannot be used; the message names the input and what was wrong with it."""
