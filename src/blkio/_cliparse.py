"""What every subcommand's command line shares: the program name as it was
invoked, the exit statuses, an argparse parser that suggests the option a
user probably meant, and the one message for a device that cannot be
opened.  It opens nothing and knows no subcommand's options."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable, Iterable, NoReturn, Optional, Sequence

__all__ = ["EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED", "SuggestingParser",
           "did_you_mean", "int_type", "open_failure", "program_name", "seconds_type"]

EXIT_OK = 0
EXIT_FAILURE = 1          # the command ran and failed: I/O error, device missing, mismatch
EXIT_USAGE = 2            # the command line is wrong: nothing was done
EXIT_INTERRUPTED = 130    # Ctrl-C


def program_name(argv0: Optional[str] = None) -> str:
    """``blkio`` for the console script (its name as run), ``python -m
    blkio`` for the module."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    base = os.path.basename(argv0 or "")
    if not base or base in ("__main__.py", "-c", "-m"):
        return "python -m blkio"
    return base


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the choice closest to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def int_type(low: int = 1, high: Optional[int] = None) -> Callable[[str], int]:
    """An argparse ``type=`` for a decimal integer from ``low`` to ``high``."""
    def convert(text: str) -> int:
        try:
            v = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if v < low or (high is not None and v > high):
            what = (f"must be {low} to {high}" if high is not None
                    else "must be positive" if low == 1 else f"must be at least {low}")
            raise argparse.ArgumentTypeError(f"{what}: {text!r}")
        return v
    convert.__name__ = "integer"
    return convert


def seconds_type(text: str) -> float:
    """An argparse ``type=`` for a positive number of seconds."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return v


def connect_timeout_type(text: str) -> "float | None":
    """An argparse ``type=`` for --connect-timeout: seconds, or ``inf`` /
    ``none`` to wait without limit."""
    if text.lower() in ("inf", "none"):
        return None
    return seconds_type(text)


#: The help of every command's --connect-timeout.
CONNECT_TIMEOUT_HELP = ("seconds to wait for a vhost-user backend to answer (an export serves "
                        "one client at a time); inf waits without limit (default: 30)")

#: The help of --reconnect and --reconnect-timeout (blkio copy).
RECONNECT_HELP = ("vhost-user devices survive a restart of their daemon: requests in flight "
                  "are resubmitted once its socket is back (see 'Daemon restarts' in the "
                  "drivers guide)")
RECONNECT_TIMEOUT_HELP = ("with --reconnect, seconds to wait for a daemon to come back before "
                          "the copy fails; inf waits without limit (default: 30)")


def open_failure(what: str, error: BaseException) -> str:
    """The message for ``what`` (a device and its path, or a copy side)
    that could not be opened: the path is said once, by ``what``."""
    if isinstance(error, OSError):
        reason = error.strerror or str(error)
        # blkio's connect errors end with the path they were given
        name = error.filename
        if name is not None:
            reason = reason.replace(f" (path={name!r})", "").replace(f" ({name!r})", "")
    else:
        reason = str(error)
    return f"cannot open {what}: {reason}"


class SuggestingParser(argparse.ArgumentParser):
    """argparse that names the option a misspelled one probably meant, and
    exits with status 2 (usage) after one line of usage and the error."""

    def _option_names(self) -> Sequence[str]:
        return [s for a in self._actions for s in a.option_strings if s.startswith("--")]

    def hint(self, message: str) -> str:
        """argparse's ``message``, with the option or choice probably meant."""
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            for arg in message[len(prefix):].split():
                if arg.startswith("-"):
                    message += did_you_mean(arg.split("=", 1)[0], self._option_names())
        elif "invalid choice: " in message:
            bad = message.split("invalid choice: ", 1)[1].split(" (", 1)[0].strip("'\"")
            for action in self._actions:
                names = [*action.option_strings, action.dest, str(action.metavar)]
                if action.choices and any(f"argument {n}:" in message for n in names):
                    return message + did_you_mean(bad, [str(c) for c in action.choices])
        return message

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {self.hint(message)}\n")
