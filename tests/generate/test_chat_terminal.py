"""`ftc chat` in a real terminal (a pseudo-terminal, as over ssh): it prompts, streams each reply,
keeps the history, clears it on /reset and exits 0 on /exit; and through a plain pipe, as in
scripts, it reads turns from stdin and ends at its end."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import train_testlib as tl

from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.sampler import GenerateConfig
from ftc.backends.jax.generate.source import load_source
from ftc.backends.jax.generate.text import StopStrings

TIMEOUT = 240  # model load and compile in a fresh process on a loaded 2-core machine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tl.make_model_dir(tmp_path_factory.mktemp("model"))


def _ftc(*args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device: nothing to shard
    return [sys.executable, "-c", "from ftc.cli import main; main()", *args], env


def _expected_replies(model_dir, turns):
    """The replies `ftc chat` must give for `turns` (the library's chat, same settings)."""
    src = load_source(model_dir)
    replies = []
    session.chat(
        src,
        src.sampler(),
        src.params,
        turns,
        replies.append,
        0,
        GenerateConfig(6, eos_ids=src.eos_ids),
        StopStrings(src.tokenizer, []),
    )
    return "".join(replies)


def _read_until(fd, buffer: bytearray, marker: bytes, count: int, deadline: float) -> None:
    """Read the terminal into `buffer` until `marker` appears `count` times."""
    while buffer.count(marker) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} from ftc chat; it wrote: {bytes(buffer)!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"ftc chat ended before {marker!r}; it wrote: {bytes(buffer)!r}"
            buffer += chunk


def test_chat_in_a_terminal_prompts_streams_resets_and_exits(model_dir):
    cmd, env = _ftc("chat", model_dir, "--max-new-tokens", "6")
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=terminal, stdout=terminal, stderr=terminal, env=env, close_fds=True)
    os.close(terminal)
    out = bytearray()
    deadline = time.monotonic() + TIMEOUT
    try:
        _read_until(controller, out, b"you> ", 1, deadline)
        assert b"/reset clears the history" in out
        for count, turn in enumerate((b"hello there", b"how are you"), start=2):
            os.write(controller, turn + b"\n")
            _read_until(controller, out, b"you> ", count, deadline)  # the reply, then the next prompt
        os.write(controller, b"/reset\n")
        _read_until(controller, out, b"(history cleared)", 1, deadline)
        os.write(controller, b"/exit\n")
        assert proc.wait(timeout=max(deadline - time.monotonic(), 1)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = out.decode("utf-8", "replace").replace("\r\n", "\n")
    # The terminal shows each streamed reply after "model> ", the second one with the first turn
    # in its history: the same text the library's chat gives.
    replies = [chunk.split("\nyou> ")[0] for chunk in text.split("model> ")[1:]]
    expected = _expected_replies(model_dir, ["hello there", "how are you"])
    assert len(replies) == 2
    assert "".join(r + "\n" for r in replies) == expected
    assert "Traceback" not in text


@pytest.mark.slow  # a second fresh process; the fast suite feeds stdin through click (test_generate_cli.py)
def test_chat_through_a_pipe_reads_turns_until_the_input_ends(model_dir):
    cmd, env = _ftc("chat", model_dir, "--max-new-tokens", "6")
    proc = subprocess.run(cmd, input="hello there\n/reset\nhow are you\n", capture_output=True, text=True, env=env,
                          timeout=TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "you> " not in proc.stdout  # no prompts when stdin is not a terminal
    first = _expected_replies(model_dir, ["hello there"])
    second = _expected_replies(model_dir, ["how are you"])  # /reset: the second turn alone
    assert proc.stdout == first + "(history cleared)\n" + second
