"""The one command-line convention of every entry point (`python -m avllm_jax.<name>`, tools/*.py).

Every command builds its flags with `Parser` (the standard library's argparse), so that:

- a user error is one line, `error: <what and where>`, with a documented exit status
  (avllm_jax/errors.py; docs/cli.md): a bad command line is a `UsageError` (status 2, no usage
  dump), anything else the user gave wrong an `AvllmError` (status 1). `--debug` (or
  AVLLM_DEBUG=1) shows the traceback instead. `entry_point` does this for a command's main;
- a flag is spelt with hyphens or underscores alike (`--max-new-tokens`, `--max_new_tokens`);
  `--help` shows the hyphens;
- flags that several commands share are defined here once (`add_distributed_flags`,
  `add_config_flag`), and every command takes `--debug` and `--log-level`;
- a training config is `--config=FILE[:ARGUMENT]` plus `--config.a.b=VALUE` overrides, read
  with ml_collections' own parser (each field's type from the file), in any order;
- the library logs through `logging` under the `avllm_jax` logger: process 0 at INFO, the
  others at WARNING, unless `--log-level` asks otherwise.

Why argparse and not absl flags: absl's flags live in one global registry, so two modules that
define the same flag (`--config` in train and plan, the multi-host flags in train and
evaluate) could not be imported together; the code base solved that three ways. An argparse
parser is a value a command builds when it runs: it can be built twice, tested in-process with
an argv list, takes positional arguments (export's workdir) and hyphenated names, and is in the
standard library. ml_collections' `--config` parsing is absl's, so it runs here on a private
absl `FlagValues`, fed only the `--config` tokens.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import sys
from collections.abc import Callable

from avllm_jax.errors import EXIT_INTERRUPTED, AvllmError, UsageError, describe_error, install_command

DEBUG_ENVIRONMENT = "AVLLM_DEBUG"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_CONFIG_PREFIXES = ("--config.", "--noconfig.")

logger = logging.getLogger("avllm_jax")


class Exit(SystemExit):
    """How `entry_point` ends a command on a user error: the process exits with `code` (the
    error's status), and in-process callers (tests) read the message as `str(exit)`."""

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with the convention above. `parse_args` raises UsageError; with
    `add_config_flag`, its `config` is the loaded ConfigDict, overrides applied."""

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        super().__init__(
            prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs
        )
        self._check_override: Callable[[str], str | None] | None = None
        self._has_config = False
        self.add_argument(
            "--debug",
            action="store_true",
            default=os.environ.get(DEBUG_ENVIRONMENT) == "1",
            help=f"show the traceback of an error (${DEBUG_ENVIRONMENT}=1 too)",
        )
        self.add_argument(
            "--log-level",
            choices=LOG_LEVELS,
            type=str.upper,
            default=None,
            help="what the library logs (default: INFO on process 0, WARNING on the others)",
        )

    def error(self, message: str):  # argparse's: prints the usage and exits 2
        raise UsageError(f"{message} (--help lists the flags)")

    def add_config_flag(self, help_text: str, check_override: Callable[[str], str | None] | None = None) -> None:
        """`--config=FILE[:ARGUMENT]` (required) and its `--config.FIELD=VALUE` overrides.
        `check_override(dotted_field)` returns what is wrong with a field's name, or None."""
        self.add_argument("--config", required=True, metavar="FILE[:ARGUMENT]", help=help_text)
        self._check_override = check_override
        self._has_config = True
        self.epilog = (
            self.epilog or ""
        ) + "Any config field can be overridden: --config.FIELD=VALUE (a.b.c for nested)."

    def parse_args(self, args=None, namespace=None) -> argparse.Namespace:  # type: ignore[override]
        argv = list(sys.argv[1:] if args is None else args)
        rest, overrides = _split_config_overrides(argv) if self._has_config else (argv, [])
        if overrides and not self._has_config:
            raise UsageError(f"{overrides[0]}: this command takes no --config")
        parsed = super().parse_args([_hyphenated(arg) for arg in rest], namespace)
        _absl_flags_read()
        if self._has_config:
            parsed.config = load_config(parsed.config, overrides, self._check_override)
        return parsed


def _absl_flags_read() -> None:
    """Marks absl's global flags parsed, at their defaults: grain and orbax read them, and absl
    refuses reads before a parse (no command here defines absl flags)."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _hyphenated(arg: str) -> str:
    """`--max_new_tokens=4` -> `--max-new-tokens=4`: one flag, either spelling."""
    if not arg.startswith("--") or arg.startswith(_CONFIG_PREFIXES):
        return arg
    name, equals, value = arg.partition("=")
    return name.replace("_", "-") + equals + value


def _split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the other arguments, the `--config.FIELD[=VALUE]` overrides), each override one token."""
    rest, overrides = [], []
    tokens = iter(range(len(argv)))
    for i in tokens:
        arg = argv[i]
        if not arg.startswith(_CONFIG_PREFIXES):
            rest.append(arg)
        elif "=" in arg or arg.startswith("--noconfig.") or i + 1 == len(argv) or argv[i + 1].startswith("--"):
            overrides.append(arg)  # `--config.flag` alone sets a bool
        else:
            overrides.append(f"{arg}={argv[i + 1]}")
            next(tokens)
    return rest, overrides


def load_config(spec: str, overrides: list[str], check_override: Callable[[str], str | None] | None = None):
    """The ConfigDict of `--config=spec` with `overrides` (`--config.a.b=VALUE`) applied, as
    ml_collections' config flag reads them. Each failure is a UsageError naming its cause: the
    file, the field that does not exist, or the override whose value does not parse."""
    from absl import flags
    from ml_collections import config_flags

    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
        raise UsageError(f"--config={spec}: the config file {path} does not exist (No such file)")
    for override in overrides:
        field = override.split("=", 1)[0].split(".", 1)[1]
        if check_override and (problem := check_override(field)):
            raise UsageError(f"{override.split('=', 1)[0]}: {problem}")

    def parse(tokens):
        argv = ["config", f"--config={spec}", *tokens]
        flag_values = flags.FlagValues()
        holder = config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
        flag_values(argv)
        return holder.value

    try:
        config = parse([])
    except Exception as error:  # whatever the file raises
        raise UsageError(f"config file {spec}: {describe_error(error)}") from error
    if not overrides:
        return config
    try:
        return parse(overrides)
    except Exception as error:  # absl's: "flag --config.num_steps=abc: invalid literal for int() ..."
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(message.removeprefix("flag ")) from error


def add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of a multi-process job (avllm_jax/runtime.py), each with its environment variable."""
    parser.add_argument(
        "--coordinator-address", default=None, help="HOST:PORT of process 0 ($AVLLM_COORDINATOR_ADDRESS)"
    )
    parser.add_argument("--num-processes", type=int, default=None, help="processes of the job ($AVLLM_NUM_PROCESSES)")
    parser.add_argument(
        "--process-id", type=int, default=None, help="this process, 0 to num_processes - 1 ($AVLLM_PROCESS_ID)"
    )
    parser.add_argument(
        "--distributed-timeout-s",
        type=float,
        default=300,
        help="how long the processes of a multi-process job wait for each other (seconds)",
    )
    parser.add_argument(
        "--heartbeat-timeout-s",
        type=float,
        default=60,
        help="a process that sends no heartbeat for this long is declared lost; the others then exit naming it "
        "(seconds; docs/multihost.md)",
    )


def initialize_distributed(args: argparse.Namespace, *, recoverable: bool = True) -> bool:
    """Starts the multi-process job that `add_distributed_flags`' flags describe, if any, and
    sets this process's log level (the others log at WARNING); returns whether it started one."""
    import jax

    from avllm_jax import runtime

    started = runtime.initialize_distributed(
        args.coordinator_address,
        args.num_processes,
        args.process_id,
        timeout_s=args.distributed_timeout_s,
        heartbeat_s=args.heartbeat_timeout_s,
        recoverable=recoverable,
    )
    configure_logging(args, process_index=jax.process_index())
    return started


_handlers: list[logging.Handler] = []


class _StandardStream(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a line is written (a test's
    capture replaces them)."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the property reads sys instead
        del value


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(args: argparse.Namespace, *, process_index: int = 0, stream: str | None = None) -> None:
    """The library's log (the `avllm_jax` logger) at --log-level, by default INFO on process 0
    and WARNING on the others; dependencies' logs at WARNING. Lines go to stderr, warnings
    prefixed `warning:`; with stream="stdout" (training, whose log is its output) the INFO lines
    go to stdout and the warnings still to stderr. Called again after a multi-process job
    starts (`initialize_distributed`), it keeps the streams and sets the level."""
    root = logging.getLogger()
    if not _handlers or stream is not None:
        # Ours by their mark, not by this module's list: a second copy of this module (a test that
        # runs an entry point in-process) has a list of its own, and its handlers would print twice.
        for handler in list(root.handlers):
            if getattr(handler, "avllm_jax_handler", False):
                root.removeHandler(handler)
        _handlers.clear()
        # absl's first log call, made while importing a dependency, installs basicConfig's
        # handler on stderr: the command's handlers replace it, or every line would come twice.
        for handler in list(root.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
                root.removeHandler(handler)
        if stream == "stdout":
            _handlers.append(_StandardStream("stdout"))
            _handlers[0].addFilter(lambda record: record.levelno < logging.WARNING)
            _handlers.append(_StandardStream("stderr"))
            _handlers[1].setLevel(logging.WARNING)
        else:
            _handlers.append(_StandardStream("stderr"))
        for handler in _handlers:
            handler.setFormatter(_Formatter("%(message)s"))
            handler.avllm_jax_handler = True  # type: ignore[attr-defined]  # the mark read above
            root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save at INFO
    level = args.log_level or ("INFO" if process_index == 0 else "WARNING")
    logger.setLevel(level)
    logging.getLogger("__main__").setLevel(level)  # the command's own module, run with -m


def entry_point(main: Callable[..., object]) -> Callable[..., object]:
    """Wraps a command's `main(argv)`: an AvllmError becomes `error: <message>` on stderr and
    the error's exit status (`Exit`), a Ctrl-C status 130; with --debug they propagate."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None):
        argv = list(sys.argv[1:] if argv is None else argv)
        debug = "--debug" in argv or os.environ.get(DEBUG_ENVIRONMENT) == "1"
        try:
            return main(argv)
        except AvllmError as error:
            if debug:
                raise
            message = f"error: {error}"
            print(message, file=sys.stderr, flush=True)
            raise Exit(error.exit_code, message) from None
        except KeyboardInterrupt:
            if debug:
                raise
            print("\ninterrupted", file=sys.stderr, flush=True)
            raise Exit(EXIT_INTERRUPTED, "interrupted") from None

    return run


def require_file(path: str, flag: str, what: str = "file") -> None:
    """A UsageError unless `path` is an existing file: checked before any model loads."""
    if not os.path.isfile(path):
        reason = "is a directory" if os.path.isdir(path) else "does not exist"
        raise UsageError(f"{flag} {path}: the {what} {reason}")


def require_extra(extra: str, *modules: str) -> None:
    """Imports `modules`, the optional dependencies of the install extra `extra` (pyproject.toml),
    or raises an AvllmError saying how to install them. A command calls it once its flags and
    files are checked and imports its extra's code after it, so that --help and a bad flag work
    on an install without the extra."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # something the module itself imports: a broken install, keep its traceback
                raise
            raise AvllmError(
                f"{module} is not installed, and this command needs it: install the '{extra}' extra, "
                f"{install_command(extra)} in the repository (README, Install)"
            ) from None


def require_directory(path: str, flag: str, what: str = "directory") -> None:
    if not os.path.isdir(path):
        reason = "is a file" if os.path.exists(path) else "does not exist"
        raise UsageError(f"{flag} {path}: the {what} {reason}")
