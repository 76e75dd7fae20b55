"""bench/torture.py end to end, small: SIGKILL a real ``wacored run`` under load, and lose nothing.

300 signed messages from 8 concurrent senders, the daemon SIGKILLed twice at seeded points of the
load and restarted, then restarted once more and drained: every acknowledged message must have
reached the downstream or the dead-letter table. The script exits 1 when one did not. Mode
worker-kill does the same with two worker processes, SIGKILLing one worker at a time (the supervisor
restarts it, the other keeps serving).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import trio

TORTURE = Path(__file__).resolve().parent.parent / "bench" / "torture.py"


async def run_torture(mode: str) -> str:
    """A small `torture.py --mode MODE` run that must exit 0; its report."""
    argv = [
        sys.executable,
        str(TORTURE),
        "--mode",
        mode,
        "--messages",
        "300",
        "--signals",
        "2",
        "--wacored",
        f"{sys.executable} -m wacored",
        "--max-load-s",
        "20",
        "--drain-timeout",
        "15",
    ]
    with trio.fail_after(45):  # 7-11 s on a 2-CPU machine; the bound is for a hung daemon
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    out = done.stdout.decode()
    assert done.returncode == 0, out + done.stderr.decode()[-2000:]
    figures = dict(re.findall(r"^(sent|acknowledged|LOST) +(\d+)", out, re.MULTILINE))
    assert figures == {"sent": "300", "acknowledged": "300", "LOST": "0"}, out
    return out


async def test_sigkill_under_load_loses_no_acknowledged_message() -> None:
    out = await run_torture("kill")
    assert re.search(r"^daemon +4 starts", out, re.MULTILINE), out


async def test_sigkill_of_one_worker_under_load_loses_no_acknowledged_message() -> None:
    out = await run_torture("worker-kill")
    assert re.search(r"^workers killed +2, restarted 2 ", out, re.MULTILINE), out
    assert re.search(r"^daemon +2 starts", out, re.MULTILINE), out  # the supervisor: only the final restart
