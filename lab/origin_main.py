"""Runs edgeproxy's demo origin as a process (in the lab's origin namespace) until SIGTERM.

    python -m lab.origin_main --host 0.0.0.0 --port 8080 [--max-seconds 86400]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from edgeproxy.demo import DemoOrigin


async def serve(host: str, port: int, max_seconds: float) -> None:
    origin = DemoOrigin()
    bound = await origin.listen(host, port)
    print(f"lab origin: demo origin on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max_seconds)
    await origin.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.origin_main")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--max-seconds", type=float, default=86400.0, help="exit after this long")
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
