"""Errors that carry a clear message about what was wrong and where, and the exit codes of a
stop by signal."""

import signal

# the signals that stop a node or a local federation; a process stopped by one exits with
# `signal_exit_code`, never 0 (which says the federation finished)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def signal_exit_code(signum: int) -> int:
    """128 + the signal's number (SIGTERM 143, SIGINT 130), as a shell reports a process that
    signal ended: a supervisor can tell a stop from a finished (0) or failed run."""
    return 128 + signum


class InputError(ValueError):
    """Bad input from outside (a data file, a config, a certificate, a message): says what and where."""


# Text from outside quoted back in a status, an upload reply or a log line is cut to this many
# characters: gRPC drops a status message over 16 KiB (the caller sees RESOURCE_EXHAUSTED, not why
# it was refused), and a caller must not make a server log megabytes.
MAX_QUOTED = 80


def counted(n: int, noun: str) -> str:
    """'1 option', '2 options': a count in a message, in the right number."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def quoted(text: str, limit: int = MAX_QUOTED) -> str:
    """`text` (from a node or any other caller) as a message or log line may show it: repr-escaped, so a newline or a
    terminal escape cannot forge a log line, and at most `limit` characters of it."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
