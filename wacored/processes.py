"""Worker processes and their supervisor: starting one, waiting for it, and a worker outliving no
supervisor (`workers.py` uses the first part, ``wacored worker`` the second).

A worker must not keep serving once its supervisor is gone, however it went (SIGKILL included): it
asks the kernel for SIGTERM when its parent dies (`die_with_parent`, Linux ``PR_SET_PDEATHSIG``),
and watches a pipe whose write end only the supervisor holds (`parent_gone`), which works anywhere.

Error handling:
    `spawn` raises what `subprocess.Popen` raises (`OSError`); nothing else here raises.

Cancellation:
    `wait_exit` and `parent_gone` may be cancelled at any point; they hold nothing but a pidfd,
    closed on the way out.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess

import trio

PR_SET_PDEATHSIG = 1
PDEATHSIG_GRACE_S = 0.5


def spawn(command: list[str], env: dict[str, str], pass_fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """Start a worker from the calling thread: the event loop's (main) thread, on purpose.

    Not `trio.lowlevel.open_process`: it forks from a worker thread of trio's cache, and
    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits (prctl(2)), which trio's
    idle threads do after 10 s. Measured: a child of `open_process` that asked for SIGTERM got it
    10.0 s after its start, its parent alive. The main thread lives as long as the supervisor. The
    fork and exec block the loop for a few milliseconds, once per worker start.
    """
    return subprocess.Popen(command, env=env, pass_fds=pass_fds)


async def wait_exit(process: subprocess.Popen[bytes]) -> int:
    """Wait for `process` to exit without a thread (a pidfd becomes readable when it does)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: poll
        while process.poll() is None:  # noqa: ASYNC110 -- nothing to wait on without a pidfd
            await trio.sleep(0.1)
        return process.wait()
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return process.wait()


def exit_status(code: int) -> dict[str, object]:
    """A worker's exit as log fields: ``exit_code``, or ``signal`` when a signal ended it."""
    if code < 0:
        try:
            return {"signal": signal.Signals(-code).name}
        except ValueError:
            return {"signal": -code}
    return {"exit_code": code}


# --- the worker's side ----------------------------------------------------------------------------


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when our parent dies (Linux ``PR_SET_PDEATHSIG``); False when it
    is already gone (we were reparented before asking) or the call is unavailable."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux, or refused by a seccomp filter: the pipe (`parent_gone`) still tells
    return os.getppid() == parent


async def parent_gone(fd: int) -> None:
    """Return once the supervisor's end of the pipe `fd` is closed (it exited, or was killed).

    Nothing is ever written to the pipe: readable means end of file. The kernel closes a dying
    process's files just before it sends the death signal: waiting `PDEATHSIG_GRACE_S` more lets that
    SIGTERM stop the worker first (else it would arrive as a second signal and cut the drain short).
    """
    while True:
        await trio.lowlevel.wait_readable(fd)
        if not os.read(fd, 512):
            break
    await trio.sleep(PDEATHSIG_GRACE_S)
