"""What every script shares: one kind of user error and one way to report it, argument types, atomic writes.

Bad input raises ``UserError`` or one of its kinds (``DatasetError``, ``ArchitectureError``,
``ResultsFileError``, ...); ``run_cli`` (``cli_status`` for a ``main`` that returns its exit status)
turns it into one line on stderr and exit status 2, before any output is written. Ctrl-C ends a
script with one line that says how to continue, and exit status 130. This module imports only the
standard library, so that every other module may import it; checkpoints are in checkpoints.py,
torchrun in distributed.py.
"""
import argparse
import gc
import os
import sys
import tempfile
from typing import Callable, Optional

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what a shell reports for Ctrl-C

#: How to continue an interrupted evaluation script (``run_cli``'s default).
RESUME_EVALUATION = "run the same command again to continue (complete rows are kept)"
#: How to continue an interrupted training run.
RESUME_TRAINING = "run the same command with --resume to continue from the last saved epoch"


class UserError(ValueError):
    """An input problem; the message names it and says how to fix it."""


def cli_status(main: Callable[[], Optional[int]], resume_hint: str = RESUME_EVALUATION) -> int:
    """Run ``main``; its exit status (0 for None), or that of the input problem or Ctrl-C it ended with.

    An input problem (a ``UserError``) prints ``error: {message}`` and gives status 2. Ctrl-C gives
    status 130 and the line ``interrupted: {resume_hint}``; the scripts write every row and checkpoint
    whole (appended and flushed, or replaced atomically), so what was written before the interruption
    stays usable.
    """
    try:
        return main() or 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        pass
    # Out of the handler, so that the interrupted frames are freed first: their progress bars close (and print)
    # before the last line.
    gc.collect()
    print(f"\ninterrupted: {resume_hint}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run_cli(main: Callable[[], object], resume_hint: str = RESUME_EVALUATION):
    """Run ``main`` through ``cli_status`` (what it returns is ignored); exit with the status unless it is 0."""
    def run():
        main()
    status = cli_status(run, resume_hint)
    if status:
        sys.exit(status)


# --------------------------------------------------------------------------- argument types

def _number(kind, predicate, requirement):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a valid {kind.__name__}")
        if not predicate(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {requirement}")
        return value
    parse.__name__ = f"{requirement} {kind.__name__}"
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive")
positive_float = _number(float, lambda v: v > 0, "a positive")
nonnegative_int = _number(int, lambda v: v >= 0, "a non-negative")
nonnegative_float = _number(float, lambda v: v >= 0, "a non-negative")
probability = _number(float, lambda v: 0 < v < 1, "in the open interval (0, 1)")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, unless its help already names it or there is none to show
    (None, an empty string, a switch's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
                or action.default == "" or not action.option_strings or action.nargs == 0):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (usage goes to --help), exit status 2, and defaults in ``--help``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- atomic writes

def replace_atomic(path: str, write: Callable, binary: bool = False):
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync, then rename it over ``path``.

    A crash leaves either the old file or the new one. The new file gets the
    usual permissions (those of a file created with ``open``).
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
