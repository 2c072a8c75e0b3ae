"""The command line of every script here: --help shows each flag's default, and what a user can
fix (a bad flag, a missing file, a full disk) is one line, never a traceback.
"""
import argparse
import os
import signal
import sys
import threading
from contextlib import contextmanager

# Every script imports this module first, so that Ctrl-C while the rest load (torch takes a
# second or two) ends it at once, quietly, as the signal's default does; Parser.parse_args hands
# Ctrl-C back to Python (KeyboardInterrupt, which one_line_errors makes one line) from there on.
# A script started in the background ignores SIGINT: that stays.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import torch  # noqa: E402

from data import DataError  # noqa: E402


class Parser(argparse.ArgumentParser):
    """The command line of every script here: the script's docstring as written, each flag's
    help ending with its default (or "required"), and a bad flag in one line (the usage dump
    argparse adds would bury it)."""

    def __init__(self, description, **kwargs):
        super().__init__(description=description,
                         formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_argument(self, *names, **kwargs):
        default = kwargs.get("default", False if kwargs.get("action") == "store_true"
                             else self.argument_default)
        if kwargs.get("required"):
            kwargs["help"] = f"{kwargs.get('help', '')} (required)"
        elif (default is not argparse.SUPPRESS and kwargs.get("action") != "help"
              and "default" not in kwargs.get("help", "")):  # a help may say its own default
            shown = ("unset" if default is None else "off" if default is False
                     else str(default).replace("%", "%%"))
            kwargs["help"] = f"{kwargs.get('help', '')} (default: {shown})"
        return super().add_argument(*names, **kwargs)

    def parse_args(self, args=None, namespace=None):
        if (signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # set above, while importing
                and threading.current_thread() is threading.main_thread()):  # (where signals go)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().parse_args(args, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by a script's own handler where it stops as for Ctrl-C: exit 143."""


@contextmanager
def one_line_errors(interrupted="stopped", out_of_memory="out of memory"):
    """Around a script's work: what a user can fix (bad input, a missing or unreadable file, a
    full disk, a NaN) becomes `error: ...` on one line and exit 2, never a traceback; so does
    running out of memory, with the script's advice; Ctrl-C is one line and exit 130."""
    try:
        yield
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except (ValueError, OSError, FloatingPointError, DataError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        print(f"error: {out_of_memory}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"error: {interrupted}", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)  # as the signal itself would
