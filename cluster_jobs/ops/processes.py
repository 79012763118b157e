"""Stopping a process ddm started (a Ray head, Prometheus) by its recorded PID, never by
process name: other heads or Prometheus servers of the same user keep running. A recorded
PID is checked against the command line ddm started before it is signalled: the process
may have exited since, and the PID gone to another program."""

from __future__ import annotations

import os
import signal
import time

import psutil


def alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def command_line(pid: int) -> list[str] | None:
    """The argv `pid` runs, or None when no process (a zombie included) has that PID. A
    process of another user whose argv cannot be read answers [] (never one of ours)."""
    if not alive(pid):  # reaps our own exited child first
        return None
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return []


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of process group `pgid` whose leader has exited. Safe by the
    kernel's rule that a PID is not handed out again while a group still carries it as its
    id: every member is a descendant of the leader ddm started."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(pid: int, grace_s: float = 15.0, *, group: bool = False) -> None:
    """SIGTERM `pid`, then after `grace_s` SIGKILL it, or with `group` whatever is left of
    its process group (a process started with start_new_session leads its own group)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        if not group:
            return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and alive(pid):
        time.sleep(0.1)
    try:
        if group:
            os.killpg(pid, signal.SIGKILL)
        elif alive(pid):
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
