"""The `ftc` console script: the command line, restarted once with glibc's huge-page tunable
where it applies (host_allocator.py), and a process exit that never waits on a compile.

`ftc run` compiles its train step in a thread while the weights load
(backends/jax/train/ahead.py). When the command ends while that compile still runs (a run that
failed or was stopped during its start-up), the process ends at once with the command's exit
status: `os._exit`, after the command's own clean-up and a flush of stdout and stderr, since
the interpreter's shutdown would wait for the compile (jax's exit handler tears the backend
down, which XLA must not be doing then). Once the command is over, a Ctrl-C ends the process
at once instead of raising KeyboardInterrupt inside whatever clean-up it lands in.
"""

from __future__ import annotations

import os
import signal
import sys

AHEAD = "ftc.backends.jax.train.ahead"  # looked up, not imported: commands that never load jax stay light


def main() -> None:
    from ftc.host_allocator import restart_tuned

    restart_tuned()
    from ftc.cli import main as cli_main  # after the restart, so its imports are not paid twice

    try:
        cli_main()
        code: object = 0
    except SystemExit as e:
        code = e.code
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    ahead = sys.modules.get(AHEAD)
    if ahead is not None and ahead.compiling_now():
        if code is not None and not isinstance(code, int):  # sys.exit("message")
            print(code, file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)
