"""Command line: ``python -m gossip agent --name NAME --bind HOST:PORT [--join HOST:PORT ...]``.

Runs one gossip member (:class:`gossip.agent.GossipAgent`, Serf 0.9.4-compatible on the wire) and
prints every membership change as one JSON line on stdout::

    {"event": "join", "node": "s1", "address": "127.0.0.1:7946", "status": "alive",
     "time": 1700000000.123, "tags": {"role": "pop"}}

``event`` is ``join``, ``update``, ``suspect``, ``alive`` (a suspect refuted), ``failed``,
``leave`` or ``reap``; ``status`` uses Serf's words (``alive``, ``suspect``, ``failed``,
``left``); ``time`` is Unix time. The member's own ``join`` is printed once it listens and its
own ``leave`` once a graceful leave completed.

SIGINT/SIGTERM leave gracefully (Serf's leave intent, then ``dead``), then exit 0; a second
signal stops at once. ``--keyring FILE`` reads Serf's keyring file (a JSON list of base64 keys,
the first one encrypts); ``--encrypt KEY`` takes one base64 key like ``serf agent -encrypt``.
SIGHUP re-reads the keyring file, so keys rotate without a restart: add the new key to every
member's file (second place) and SIGHUP them, then make it first everywhere, then drop the old
one. A file that does not load leaves the keys as they were (logged on stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import uvloop

import edgeproxy.timeout_backport  # noqa: F401  (asyncio fix for Python 3.11.0-3.11.2)
from gossip.agent import GossipAgent, event_record, parse_hostport
from gossip.keyring import Keyring
from gossip.swim import Config, MemberEvent

log = logging.getLogger("gossip")


def _parse_duration(text: str) -> float:
    """``30``, ``30s``, ``500ms``, ``2m``."""
    t = text.strip().lower()
    for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if t.endswith(suffix):
            return float(t[: -len(suffix)]) * mult
    return float(t)


def _parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"tag must be KEY=VALUE, not {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gossip", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("agent", help="run a gossip member, print membership changes as JSON")
    a.add_argument("--name", required=True, help="node name (unique in the cluster)")
    a.add_argument("--bind", default="0.0.0.0:7946", help="HOST:PORT for UDP and TCP")
    a.add_argument("--advertise", help="HOST:PORT other members reach us at")
    a.add_argument("--join", action="append", default=[], metavar="HOST:PORT",
                   help="member to join (repeatable); retried until one answers")  # fmt: skip
    a.add_argument("--retry-interval", type=_parse_duration, default=30.0,
                   help="time between join attempts (Serf's -retry-interval, default 30s)")  # fmt: skip
    a.add_argument("--retry-max", type=int, default=0,
                   help="give up joining after this many attempts (0 = never)")  # fmt: skip
    keys = a.add_mutually_exclusive_group()
    keys.add_argument("--keyring", help="Serf keyring file (JSON list of base64 keys)")
    keys.add_argument("--encrypt", help="one base64 key (like serf agent -encrypt)")
    a.add_argument("--tag", action="append", default=[], type=_parse_tag, metavar="KEY=VALUE",
                   help="tag (repeatable)")  # fmt: skip
    a.add_argument("--profile", choices=("lan", "wan", "local"), default="lan",
                   help="memberlist timing profile (default lan)")  # fmt: skip
    a.add_argument("--log-level", default="warning", help="stderr log level")
    return parser


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record, separators=(", ", ": ")) + "\n")
    sys.stdout.flush()


async def run_agent(args: argparse.Namespace) -> int:
    keyring: Keyring | None = None
    if args.keyring:
        keyring = Keyring.from_file(args.keyring)
    elif args.encrypt:
        keyring = Keyring.from_base64([args.encrypt])
    config = {"lan": Config.lan, "wan": Config.wan, "local": Config.local}[args.profile]()
    bind = parse_hostport(args.bind)
    advertise = parse_hostport(args.advertise, bind[1]) if args.advertise else None

    agent: GossipAgent

    def on_event(ev: MemberEvent) -> None:
        _emit(event_record(ev, agent.wall_time(ev.time)))

    agent = GossipAgent(
        args.name, bind, advertise, dict(args.tag), keyring, config, on_event=on_event
    )
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    signals = 0
    hard_stop: list[asyncio.Task[None]] = []

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        stop_requested.set()
        if signals == 2:
            # Second signal: stop at once.
            hard_stop.append(loop.create_task(agent.stop()))

    def on_hangup() -> None:
        if keyring is None or not args.keyring:
            log.warning("SIGHUP: no --keyring file to reload")
            return
        try:
            changed = keyring.reload_file(args.keyring)
        except (OSError, ValueError) as exc:
            log.error("SIGHUP: keyring %s not reloaded, keeping %d key(s): %s",
                      args.keyring, len(keyring.keys), exc)  # fmt: skip
            return
        log.warning("SIGHUP: keyring %s %s: %d key(s)", args.keyring,
                    "reloaded" if changed else "unchanged", len(keyring.keys))  # fmt: skip

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    join_task: asyncio.Task[int] | None = None
    try:
        await agent.start()
        me = agent.local_member()
        _emit(
            {
                "event": "join",
                "node": me.name,
                "address": f"{me.addr}:{me.port}",
                "status": "alive",
                "time": round(time.time(), 3),
                "tags": me.tags,
            }
        )
        logging.getLogger("gossip").info("%s listening on %s", args.name, agent.bound)
        if args.join:
            join_task = loop.create_task(
                agent.retry_join(args.join, args.retry_interval, args.retry_max)
            )
        await stop_requested.wait()
        if join_task is not None:
            join_task.cancel()
            await asyncio.gather(join_task, return_exceptions=True)
            join_task = None
        if signals == 1 and agent.running:
            ok = await agent.leave()
            me = agent.local_member()
            _emit(
                {
                    "event": "leave",
                    "node": me.name,
                    "address": f"{me.addr}:{me.port}",
                    "status": "left" if ok else "failed",
                    "time": round(time.time(), 3),
                    "tags": me.tags,
                }
            )
    finally:
        if join_task is not None:
            join_task.cancel()
            await asyncio.gather(join_task, return_exceptions=True)
        await agent.stop()
        await asyncio.gather(*hard_stop, return_exceptions=True)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(run_agent(args))


if __name__ == "__main__":
    sys.exit(main())
