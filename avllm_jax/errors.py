"""The base of every error a user can cause, and the exit statuses of the command lines.

An `AvllmError` is a mistake in what the user gave (a flag, a config, a file, a checkpoint),
told in its message: what and where. Every entry point (avllm_jax/cli.py) prints it as one
line, `error: <message>`, and exits with its `exit_code`; any other exception is a bug and
keeps its traceback. Each package's own errors derive from this class (and, where callers
already caught them as such, from ValueError or RuntimeError too). This module imports
nothing, so that every layer, data and models included, can raise these.
"""

from __future__ import annotations

# Exit statuses of every command line (docs/cli.md).
EXIT_OK = 0
EXIT_ERROR = 1  # an AvllmError: bad input, data, config value or checkpoint
EXIT_USAGE = 2  # the command line itself: an unknown or missing flag, a bad flag value, the config file
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_PREEMPTED = 143  # SIGTERM: training saved at the step boundary and stopped


def install_command(extra: str) -> str:
    """What installs the optional dependencies `extra` (pyproject.toml) into a checkout's venv,
    for the errors that find them missing."""
    return f"pip install -c constraints.txt -e '.[{extra}]'"


class AvllmError(Exception):
    """A user error; the message names what is wrong and where."""

    exit_code = EXIT_ERROR


class UsageError(AvllmError):
    """The command line cannot be used: a flag unknown, missing or with a bad value, or the
    config file it names missing or failing to load."""

    exit_code = EXIT_USAGE


def describe_error(error: BaseException) -> str:
    """The root cause of a (chained) exception in one line: orbax and tensorstore bury the
    file that is missing or damaged under several wrappers, a config file its own error."""
    cause: BaseException | None = error
    while cause is not None:
        error, cause = cause, cause.__cause__ or cause.__context__
    lines = str(error).strip().splitlines() or [""]
    return f"{type(error).__name__}: {lines[0][:400]}"
