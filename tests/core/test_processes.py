"""Stopping child process groups: SIGTERM first, SIGKILL for whatever ignores it, grandchildren included."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from personabot.core.errors import one_line
from personabot.core.processes import stop_process, stop_process_groups

# A child that ignores SIGTERM and leaves a grandchild behind it.
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
            "print('ready', flush=True); time.sleep(600)")


def _start(code: str) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 10
    while not parent.children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return process, [parent, *parent.children(recursive=True)]


def _gone(tree: list[psutil.Process]) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree):
            return True
        time.sleep(0.05)
    return False


def test_a_group_that_ignores_sigterm_is_killed_after_the_grace_and_reported() -> None:
    stubborn, stubborn_tree = _start(STUBBORN)
    polite, polite_tree = _start("import subprocess, sys, time; "
                                 "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
                                 "print('ready', flush=True); time.sleep(600)")
    killed: list[int] = []
    started = time.monotonic()
    stop_process_groups([polite, stubborn], 1.0, on_kill=killed.append)
    assert killed == [1]  # only the one that outlived the grace
    assert time.monotonic() - started < 8
    assert stubborn.returncode is not None and polite.returncode is not None
    assert _gone(stubborn_tree) and _gone(polite_tree)  # grandchildren too


def test_stop_process_on_an_ended_process_returns_at_once() -> None:
    process = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    process.wait()
    started = time.monotonic()
    stop_process(process)
    assert time.monotonic() - started < 1


def test_one_line_names_the_type_and_keeps_the_first_line() -> None:
    error = RuntimeError("connection refused\nSQL: SELECT secret FROM t")
    assert one_line(error) == "RuntimeError: connection refused"
    assert one_line(error, with_type=False) == "connection refused"
    assert one_line(ValueError()) == "ValueError: no detail"
    assert one_line(ValueError(), with_type=False) == "ValueError"
    assert len(one_line(OSError("x" * 2000))) == 500
