# .venv/bin/python benchmarks/bench_sandbox.py [--programs N]
"""What the sandbox's private mounts cost and what they stop.

1. Per-program time: N small passing programs, one at a time, with full isolation (private /tmp, /var/tmp,
   /dev/shm, IPC and a read-only view of the other mounts) and with the weaker isolation that --unsafe-sandbox
   accepts (fresh uid and network namespace only), interleaved so machine load hits both alike.
2. Escapes: the attempts of tests/test_sandbox.py (a file in every world-writable folder found now, an append
   to every world-writable file, System V shared memory, message queue and semaphore, a POSIX message queue, a
   key in the persistent keyring), counted as worked inside the run and as left behind after it, under both
   isolations. The weaker run leaves a key of ~100 bytes that the kernel drops after
   /proc/sys/kernel/keys/persistent_keyring_expiry seconds (3 days by default).
3. Caps: how many bytes (files of 16 MiB, the file-size limit, up to 256 MiB) and how many empty files (up to
   10,000) one program can put in each scratch folder and its working folder; removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
import warnings
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlhf.eval import sandbox  # noqa: E402
from tests.test_sandbox import GOOD, QUICK, run_escapes, world_writable_places  # noqa: E402


def weaker(fn):
    """Run fn under the weaker isolation (as where the kernel refuses namespaces and it was accepted)."""
    saved = sandbox._isolation
    sandbox._isolation_for(sandbox.SandboxLimits())  # the real probe, so only the mounts differ
    drop = sandbox._isolation[0]
    sandbox._isolation = (drop, False, "benchmark")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(replace(QUICK, unsafe=True))
    finally:
        sandbox._isolation = saved


def per_program_ms(limits, n: int) -> list[float]:
    out = []
    for _ in range(n):
        start = time.perf_counter()
        assert sandbox.run_program(GOOD, limits=limits).passed
        out.append(1000 * (time.perf_counter() - start))
    return out


CAPS = r"""
import json, os, sys
where, token = sys.argv[1], sys.argv[2]
folder = os.path.join(where, token)
os.mkdir(folder)
written = files = 0
try:
    for i in range(16):
        with open(os.path.join(folder, "big%d" % i), "wb") as f:
            for _ in range(16):
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1 << 20
except OSError:
    pass
try:
    for i in range(10000):
        open(os.path.join(folder, "f%d" % i), "w").close()
        files += 1
except OSError:
    pass
print(json.dumps([written >> 20, files]))
"""


def caps(limits) -> dict[str, list[int]]:
    """{folder: [MiB written, empty files made]} for one program per folder; what it left is removed."""
    out = {}
    for where in ("/tmp", "/var/tmp", "/dev/shm", "."):
        token = f"rlhf-caps-{os.getpid()}"
        program = f"import sys\nsys.argv = ['caps', {where!r}, {token!r}]\n" + CAPS
        result = sandbox.run_program(program, limits=replace(limits, timeout_s=30.0))
        assert result.passed, result.tail()
        out[where] = json.loads(result.stdout)
        if where != ".":
            shutil.rmtree(os.path.join(where, token), ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--programs", type=int, default=200, help="programs timed per isolation (0: skip)")
    args = parser.parse_args()
    full, weak = [], []
    for _ in range(args.programs // 20):  # interleaved blocks of 20
        full += per_program_ms(QUICK, 20)
        weak += weaker(lambda limits: per_program_ms(limits, 20))
    if full:
        print("| isolation | programs | median ms/program | mean ms/program |")
        print("|---|---|---|---|")
        for name, times in (("full (private mounts + IPC)", full), ("weaker (--unsafe-sandbox)", weak)):
            print(f"| {name} | {len(times)} | {statistics.median(times):.1f} | {statistics.mean(times):.1f} |")

    places = world_writable_places()
    print(f"\nworld-writable now: {len(places[0])} folders {places[0]}, {len(places[1])} regular files {places[1]}")
    print("\n| attempt | full: worked inside | full: left after | weaker: worked inside | weaker: left after |")
    print("|---|---|---|---|---|")
    full_report, full_left = run_escapes(places, QUICK)
    weak_report, weak_left = weaker(lambda limits: run_escapes(places, limits))
    for name in full_report:
        kind = name.split(" ", 1)[0]
        left_full = any(x == name or x.startswith("owned " + name.split(" ", 1)[1] + "/") for x in full_left)
        left_weak = any(x == name or x.startswith("owned " + name.split(" ", 1)[1] + "/") for x in weak_left)
        if kind in ("sysv", "posix", "kernel"):
            left_full, left_weak = name in full_left, name in weak_left
        print(f"| {name} | {full_report[name] == 'kept'} | {left_full} | {weak_report[name] == 'kept'} | {left_weak} |")
    print(f"\nleft after the run: full {len(full_left)} {full_left}, weaker {len(weak_left)} {weak_left}")

    full_caps, weak_caps = caps(QUICK), weaker(caps)
    print("\n| folder | full: MiB written | full: files made | weaker: MiB written | weaker: files made |")
    print("|---|---|---|---|---|")
    for where in full_caps:
        print(f"| {where} | {full_caps[where][0]} | {full_caps[where][1]} | {weak_caps[where][0]} | "
              f"{weak_caps[where][1]} |")


if __name__ == "__main__":
    main()
