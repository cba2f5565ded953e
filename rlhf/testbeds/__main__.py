"""python -m rlhf.testbeds build --out data --seed 0   -- regenerate the shipped testbed files"""

from __future__ import annotations

import argparse
import sys

from rlhf.testbeds import TESTBEDS, build_testbed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf.testbeds", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write data/<testbed>/*.jsonl from a seed")
    build.add_argument("--out", default="data", help="folder that receives one subfolder per testbed")
    build.add_argument("--seed", type=int, default=0, help="the same seed gives the same bytes")
    build.add_argument("--only", choices=sorted(TESTBEDS), action="append", help="build just these")
    args = parser.parse_args(argv)
    for name in args.only or sorted(TESTBEDS):
        for path in build_testbed(name, args.out, args.seed):
            print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
