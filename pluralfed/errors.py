"""Errors that carry a clear message about what was wrong and where."""


class InputError(ValueError):
    """Bad input from outside (a data file, a config, a certificate, a message): says what and where."""
