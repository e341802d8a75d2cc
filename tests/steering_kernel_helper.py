"""Runs edgeproxy.steering.service.Steering inside a namespace for test_steering_kernel.py.

    python tests/steering_kernel_helper.py --pop b --device b-bh --mode vxlan \
        --peers '{"a": "10.9.0.1", "b": "10.9.0.2"}' --state-dir DIR [--inject JSON]

Prints one JSON line when set up (the status), then waits for a line on stdin, stops, and
prints a second JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeproxy.config import SteeringSection
from edgeproxy.steering.service import Steering, inject
from gossip.flowtable import FlowTable


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pop", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--mode", default="route")
    p.add_argument("--peers", required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--inject", default="[]")
    a = p.parse_args()
    loop = asyncio.get_running_loop()
    table = FlowTable(a.pop)
    cfg = SteeringSection(enabled=True, backhaul_device=a.device, mode=a.mode, peers=json.loads(a.peers), min_age=0)
    st = Steering(cfg, a.pop, table, state_dir=Path(a.state_dir))
    ok = await st.start()
    inject(table, json.loads(a.inject), loop.time())
    for _ in range(200):  # bounded: until the map holds the injected entries
        if not st.projection.pending and not st._need_resync:
            break
        await asyncio.sleep(0.01)
    print(json.dumps({"ok": ok, **st.status()}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    await st.stop()
    print(json.dumps({"stopped": True}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
