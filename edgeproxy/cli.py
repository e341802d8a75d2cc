"""`edgeproxy` command line: demo, run, check."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys
from pathlib import Path

from .config import Config, ConfigError, config_from_dict, load_config


def _default_state_dir() -> str:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "edgeproxy")


def tune_gc() -> None:
    """Server-process GC settings: every request allocates many short-lived containers, and with
    the default gen-0 threshold (700) the cyclic collector ran often enough to cost a fifth of a
    cache hit. Refcounting frees request objects anyway; cycles are still collected, less often.
    Objects from start-up are frozen so full collections do not walk them."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # the event loop still works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(config: Config, duration: float | None, banner: str = "", worker: int = 0) -> None:
    from .pop import Pop

    pop = Pop(config, worker=worker)
    await pop.start()
    tune_gc()
    if banner:
        print(banner, flush=True)
    else:
        for kind, addrs in pop.addresses.items():
            for host, port in addrs:
                logging.getLogger("edgeproxy").info("%s listening on %s:%d", kind, host, port)
    try:
        await pop.run_until_signalled(duration)
    finally:
        await pop.stop()


async def _demo(args: argparse.Namespace) -> None:
    from .demo import DemoOrigin

    origin = DemoOrigin()
    origin_port = await origin.listen("127.0.0.1", args.origin_port)
    config = config_from_dict(
        {
            "pop": {"id": "demo", "state_dir": args.state_dir},
            "listen": {
                "http": [f"127.0.0.1:{args.http_port}"],
                "https": [f"127.0.0.1:{args.https_port}"],
                "quic": [f"127.0.0.1:{args.https_port}"],
            },
            "origin_groups": [
                {"name": "demo", "servers": [f"127.0.0.1:{origin_port}"], "health": {"path": "/healthz", "interval": 2.0}}
            ],
            "admin": {"listen": f"127.0.0.1:{args.admin_port}"},
            "log": {"access_log": args.access_log},
        }
    )
    h, s, a = args.http_port, args.https_port, args.admin_port
    banner = f"""edgeproxy demo: one PoP on 127.0.0.1 in front of a built-in demo origin (127.0.0.1:{origin_port})
  HTTP/1.1   http://127.0.0.1:{h}/
  HTTPS      https://localhost:{s}/        (self-signed certificate in {args.state_dir}/tls)
  HTTP/3     https://localhost:{s}/        (UDP {s})
  admin      http://127.0.0.1:{a}/metrics  /healthz  /cache/purge?url=...
Try:
  curl -si http://127.0.0.1:{h}/cached/hello      # twice: x-cache: MISS, then HIT
  curl -ski https://localhost:{s}/time
  gtlsclient --exit-on-all-streams-close 127.0.0.1 {s} https://localhost:{s}/cached/hello
  curl -s http://127.0.0.1:{a}/metrics | grep edgeproxy_cache_requests_total
Ctrl-C stops it."""
    try:
        await _serve(config, args.duration, banner)
    finally:
        await origin.close()


def _keys(args: argparse.Namespace) -> int:
    import time

    from .quic.fleet import FleetKeyError, FleetKeys

    path = Path(args.file)
    try:
        if args.action == "generate":
            FleetKeys.generate(path, now=time.time())
            print(f"{path}: new fleet key file (mode 0600); copy it to every PoP")
            return 0
        fleet = FleetKeys.load(path)
        if args.action == "add":
            key = fleet.add_key(args.id, now=time.time())
            fleet.save(path)
            print(f"{path}: added key {key.key_id}; distribute it to every PoP (then SIGHUP edgeproxy), then `keys promote --id {key.key_id}`")
        elif args.action in ("promote", "remove"):
            if args.id is None:
                print(f"edgeproxy keys {args.action}: --id is required", file=sys.stderr)
                return 2
            (fleet.set_primary if args.action == "promote" else fleet.remove_key)(args.id)
            fleet.save(path)
            print(f"{path}: key {args.id} {'is now primary' if args.action == 'promote' else 'removed'}")
        for key_id, key in sorted(fleet.keys.items()):
            mark = " (primary)" if key_id == fleet.primary.key_id else ""
            print(f"key {key_id}{mark}: created {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(key.created))} UTC")
        return 0
    except (FleetKeyError, ValueError, OSError) as e:
        print(f"edgeproxy keys {args.action}: {e}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeproxy", description="Anycast edge proxy whose connections survive route flaps.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a PoP on 127.0.0.1 in front of a built-in demo origin (no config, no root)")
    demo.add_argument("--http-port", type=int, default=8080)
    demo.add_argument("--https-port", type=int, default=8443, help="HTTPS (TCP) and HTTP/3 (UDP) port")
    demo.add_argument("--admin-port", type=int, default=9901)
    demo.add_argument("--origin-port", type=int, default=0, help="demo origin port (default: any free port)")
    demo.add_argument("--state-dir", default=_default_state_dir(), help="where the self-signed certificate is kept")
    demo.add_argument("--access-log", default="", help="access log: a path, '-' for stdout (default: off)")
    demo.add_argument("--duration", type=float, default=None, help="stop after this many seconds")

    run = sub.add_parser("run", help="run a PoP from a config file (backhaul.workers worker processes)")
    run.add_argument("--config", "-c", required=True)
    run.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    run.add_argument("--workers", type=int, default=None, help="override backhaul.workers")
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)  # set by the supervisor

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("--config", "-c", required=True)

    keys = sub.add_parser(
        "keys",
        help="manage the fleet key file (rotation: add the new key on every PoP, promote it, remove the old one later)",
    )
    keys.add_argument("action", choices=["generate", "list", "add", "promote", "remove"])
    keys.add_argument("--file", "-f", required=True, help="the fleet key file ([fleet] key_file)")
    keys.add_argument("--id", type=int, default=None, help="key id for add/promote/remove")

    args = parser.parse_args(argv)
    if args.command == "check":
        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            print(f"{args.config}: {e}", file=sys.stderr)
            return 1
        groups = ", ".join(f"{g.name} ({len(g.servers)} servers)" for g in cfg.origin_groups) or "none"
        print(f"{args.config}: ok (pop {cfg.pop.id}; origin groups: {groups})")
        return 0

    if args.command == "keys":
        return _keys(args)

    _install_uvloop()
    if args.command == "demo":
        _setup_logging("warning")
        try:
            asyncio.run(_demo(args))
        except KeyboardInterrupt:
            pass
        except OSError as e:
            print(f"edgeproxy demo: {e} (another program on these ports? see --http-port/--https-port/--admin-port)", file=sys.stderr)
            return 1
        return 0
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"{args.config}: {e}", file=sys.stderr)
        return 1
    _setup_logging(cfg.log.level)
    workers = args.workers if args.workers is not None else cfg.backhaul.workers
    workers = workers or os.cpu_count() or 1
    cfg.backhaul.workers = workers
    if workers > 1 and args.worker is None:
        from .supervisor import supervise

        command = [sys.executable, "-m", "edgeproxy", "run", "--config", args.config, "--workers", str(workers)]
        if args.duration is not None:
            command += ["--duration", str(args.duration)]
        return supervise([[*command, "--worker", str(i)] for i in range(workers)])
    try:
        asyncio.run(_serve(cfg, args.duration, worker=args.worker or 0))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"edgeproxy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
