"""The hot spots of a py-spy profile: top functions by self and by cumulative share of the samples.

``.venv/bin/python bench/profile_top.py bench/out/profile-messages.txt [--top 15] [--group file]``
reads py-spy's raw (collapsed) output, one ``frame;frame;...;leaf count`` line per distinct stack, as
``bench.py --py-spy BIN`` writes it, and prints two tables: **self** (the share of samples in which a
function is the leaf: where the CPU is spent) and **cumulative** (the share in which it is anywhere on
the stack, counted once per sample even when it recurses). py-spy only samples threads that are
running, but it does not see trio's idle worker threads as idle (they wait in a C lock acquire under
``WorkerThread._work``: 60 % of the samples of a messages run): samples whose leaf matches ``--idle``
are left out and counted apart, so a share is a share of the CPU wacored used, not of the wall time.
``--group file`` groups by source file instead of by function (all of h11 at once, say).

Pure text processing; it reads one file and writes to stdout. A malformed line is skipped and counted.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
SITE = re.compile(r".*/(site-packages|lib/python3\.\d+)/")


def short(path: str) -> str:
    """A file path without its venv or stdlib prefix: ``hypercorn/protocol/h11.py``, ``json/decoder.py``."""
    return SITE.sub("", path).removeprefix(str(Path(__file__).resolve().parent.parent) + "/")


def key(frame: str, group: str) -> str:
    m = FRAME.match(frame)
    if m is None:
        return frame
    file = short(m["file"])
    return file if group == "file" else f"{m['func']} ({file})"


IDLE = r"^WorkerThread\._work \(trio/"
"""A trio worker thread waiting for a job: its leaf is ``_work`` itself (a job's frames sit below it)."""


def tally(lines: list[str], group: str, idle: str) -> tuple[Counter[str], Counter[str], int, int, int]:
    """(self samples, cumulative samples, busy samples, idle samples left out, malformed lines)."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = bad = idle_n = 0
    idle_leaf = re.compile(idle)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            bad += bool(line.strip())
            continue
        n = int(count)
        raw = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not raw:
            continue
        if idle and idle_leaf.search(key(raw[-1], "function")):
            idle_n += n
            continue
        frames = [key(f, group) for f in raw]
        total += n
        own[frames[-1]] += n
        for name in set(frames):
            cumulative[name] += n
    return own, cumulative, total, idle_n, bad


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path, help="py-spy raw output (record --format raw)")
    p.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    p.add_argument("--group", choices=("function", "file"), default="function")
    p.add_argument("--idle", default=IDLE, help=f"regex of idle leaves to leave out ('' keeps all; default {IDLE!r})")
    args = p.parse_args()
    own, cumulative, total, idle, bad = tally(args.profile.read_text().splitlines(), args.group, args.idle)
    if not total:
        print(f"{args.profile}: no samples", file=sys.stderr)
        return 1
    print(
        f"{args.profile}: {total} busy samples ({idle} idle left out)"
        f"{f', {bad} malformed lines skipped' if bad else ''}"
    )
    for title, counts in (("self", own), ("cumulative", cumulative)):
        print(f"\ntop {args.top} by {title} share of CPU samples")
        for name, n in counts.most_common(args.top):
            print(f"{n / total * 100:6.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
