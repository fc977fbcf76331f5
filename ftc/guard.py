"""The CLI's last line of defence: no raw traceback reaches the terminal (unless `--debug`).

Every command runs inside `GuardedGroup.invoke`, so commands added later get it too. Errors a
command expects are its own business (it prints them and exits); what escapes it here is
    an OSError          the environment (permissions, a full disk, a directory where a file
                        should be): one line naming the file and what went wrong;
    KeyboardInterrupt   "interrupted", exit status 130 (SIGTERM: "terminated", 143; commands
                        see both as KeyboardInterrupt, so their clean-up runs);
    BrokenPipeError     stdout's reader is gone (`ftc plan | head`): nothing more, exit 141 as
                        SIGPIPE would;
    anything else       a bug in ftc: one line naming the command and the error, and where to
                        report it;
each with the path of a full log (the traceback, the command line, versions) written to the run
directory when the command names one (`ctx.meta[LOG_DIR]`) and is writable, else a temp file.
"""

from __future__ import annotations

import os
import platform
import signal
import sys
import tempfile
import time
import traceback

import click

from ftc import __version__

LOG_DIR = "ftc.log_dir"  # ctx.meta key: where a command would like its error log
DEBUG = "ftc.debug"  # ctx.meta key: --debug, let tracebacks through
REPORT_TO = "the ftc repository's issue tracker"


def write_log(error: BaseException, command: str, directory: str | None) -> str:
    """The full story of `error` in a new file; returns its path ("" if nothing could be written)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = (
        f"ftc {__version__} {command}: {type(error).__name__}: {error}\n"
        f"command line: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\n"
        f"python {platform.python_version()} on {platform.platform()}\n\n" + "".join(traceback.format_exception(error))
    )
    for where in (directory, tempfile.gettempdir()):
        if not where:
            continue
        try:
            fd, path = tempfile.mkstemp(prefix=f"ftc-error-{stamp}-", suffix=".log", dir=where)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            continue
    return ""


def debug_from_env(value: str | None) -> bool:
    """FTC_DEBUG as click reads --debug's envvar: FTC_DEBUG=0 (or false, no, off) is off, not on."""
    return (value or "").strip().lower() not in ("", "0", "false", "f", "no", "n", "off")


def explain(error: BaseException) -> tuple[str, bool]:
    """(the one line for the user, whether it is a bug in ftc)."""
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        other = f" -> {error.filename2}" if getattr(error, "filename2", None) else ""
        what = error.strerror or str(error)
        return f"error: {where}{what}{other}", False
    if isinstance(error, MemoryError):
        return "error: out of host memory", False
    return f"internal error: {type(error).__name__}: {str(error)[:500]}", True


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll says POLLERR); if so stdout goes
    to /dev/null, so that the interpreter's last flush at exit says nothing either."""
    try:
        import select

        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        gone = any(event & select.POLLERR for _, event in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is no file
        return False
    if gone:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return gone


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that what a command cleans up on the way out (an export's
    temporary directory) is cleaned up; `ftc run` stops its own way (train/loop.py)."""


def _terminated(signum, frame):
    raise Terminated()


class GuardedGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            previous = signal.signal(signal.SIGTERM, _terminated)
        except ValueError:  # not the main thread
            previous = None
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit, SystemExit):
            raise
        except KeyboardInterrupt as e:
            what, code = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            click.echo(f"ftc {ctx.invoked_subcommand or ''}: {what}".replace(" :", ":"), err=True)
            raise SystemExit(code) from None
        except Exception as error:
            if isinstance(error, BrokenPipeError) and _reader_gone():
                raise SystemExit(141) from None  # `ftc plan | head`: as a tool SIGPIPE ends, not an error
            if ctx.meta.get(DEBUG) or debug_from_env(os.environ.get("FTC_DEBUG")):
                raise
            command = ctx.invoked_subcommand or ""
            line, bug = explain(error)
            log = write_log(error, command, ctx.meta.get(LOG_DIR))
            report = f" (a bug in ftc: please report it at {REPORT_TO}, with the log)" if bug else ""
            click.echo(f"ftc {command}: {line}{report}", err=True)
            if log:
                click.echo(f"  full log: {log} (ftc --debug {command} ... shows the traceback)", err=True)
            raise SystemExit(1) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
