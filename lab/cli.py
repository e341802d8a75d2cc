"""`edgeproxy-lab`: the network-namespace anycast lab (up, down, status, flap, load, drain, demo).

The lab is being built (see the README's roadmap); until then every subcommand says so and exits
with status 2 instead of pretending to work.
"""

from __future__ import annotations

import argparse
import sys

COMMANDS = ("up", "down", "status", "flap", "load", "drain", "demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy-lab", description="Anycast lab with real BGP, route flaps and a survival report.")
    parser.add_argument("command", choices=COMMANDS)
    args, _ = parser.parse_known_args(argv)
    print(f"edgeproxy-lab {args.command}: the lab is not built yet; use `edgeproxy demo` for now", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
