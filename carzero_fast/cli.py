"""`carzero-fast` command line."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "time every backend side by side at CARZero dims"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: carzero-fast COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:10s} {what}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    from .bench import main as bench_main

    return bench_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
