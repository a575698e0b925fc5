"""The daemon's memory set-up: large freed blocks go back to the system, descriptors up to the hard limit."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import resource
from broker.daemon import memory

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:"))

memory.bound()
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
base = rss()
kept = []
for _ in range(3):  # bursts of 1 MB answers, as a stuck caller's calls make them, beside records that stay
    held = []
    for n in range(64):
        held.append(bytes(1_000_000 + n))
        kept.append(bytearray(4000))  # from the heap between them (over pymalloc's size)
    del held
memory.trim()
print(soft, hard, rss() - base)
"""


def test_a_burst_of_large_answers_leaves_no_lasting_growth_and_descriptors_are_raised() -> None:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    soft, hard, grown = (int(x) for x in out)
    assert soft >= min(hard, 65536)
    assert grown < 8 * 1024, f"{grown} KiB left after the bursts"


CYCLES = r"""
import gc
from broker.daemon import memory

def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) for l in fh if l.startswith("VmRSS:"))

memory.bound()
memory.settle()
gc.disable()  # as an idle daemon: no allocation drives a full collection
base = rss()
def dropped() -> None:  # what a dropped stuck session leaves: an exception whose frame holds its answer
    answer = b"x" * 1_000_000
    try:
        raise ConnectionResetError("gone")
    except ConnectionResetError as exc:
        err = exc  # a cycle: frame -> err -> traceback -> frame


for _ in range(16):
    dropped()
held = rss() - base
memory.trim()
print(held, rss() - base)
"""


def test_what_a_dropped_caller_leaves_in_cycles_is_collected_by_the_periodic_trim() -> None:
    out = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, check=True).stdout.split()
    held, after = (int(x) for x in out)
    assert held > 12 * 1024  # each cycle kept its answer alive
    assert after < 512, f"{after} KiB left after trim"
