"""The survival report (pure functions + a small CLI): load results + the flap log -> report.json and
a self-contained report.html (inline SVG and a few lines of JS; nothing fetched from the network).

    python -m lab.report --out DIR LOAD.json [LOAD.json ...] [--flaps flaps.jsonl]

Inputs
- load results (lab/load.py): per-connection counters, one row per request
  `[ts, conn, latency_ms, status, pop, error]` and per download `[ts, conn, seconds, bytes, ok, pop, error]`
  (wall clock, like the flap log);
- the flap log (lab/flap.py, `<state>/flaps.jsonl`): one entry per half-flap with `ts` (just before
  the command), `fib_ts` (the router's first FIB change after it, or null), method, pop, action.
  `edgeproxy-lab drain` logs there too, with method "drain".

"Within 1 s after a flap": a request whose [start, start + latency] overlaps
[event ts, (fib_ts or ts) + window] for some flap event (either half).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from .load_stats import ERROR_KINDS, percentile

PROTOS = ("quic", "tcp")
WINDOW_S = 1.0
POP_COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f")
FAIL_COLOUR = "#d62728"
MAX_POINTS = 6000  # latency points drawn (all failures and slow requests are always drawn)


# -- inputs -----------------------------------------------------------------------------------------

def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def event_time(e: dict[str, Any]) -> float:
    return float(e["ts"])


def flap_windows(flaps: list[dict[str, Any]], window: float = WINDOW_S) -> list[tuple[float, float]]:
    """[start, end] after each flap event: from the command to `window` s after the FIB changed (or
    after the command, when no FIB change was seen). Sorted and merged."""
    spans = sorted((float(e["ts"]), float(e.get("fib_ts") or e["ts"]) + window) for e in flaps if "ts" in e)
    merged: list[tuple[float, float]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def in_windows(start: float, end: float, windows: list[tuple[float, float]]) -> bool:
    return any(start <= b and end >= a for a, b in windows)


def rows(loads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every request of every load file as a dict with the connection's client and protocol."""
    out: list[dict[str, Any]] = []
    for li, load in enumerate(loads):
        conns = {c["index"]: c for c in load.get("connections", [])}
        for ts, ci, lat, status, pop, err in load.get("requests", []):
            c = conns.get(ci, {})
            out.append({"ts": ts, "end": ts + lat / 1000, "latency_ms": lat, "status": status, "pop": pop, "error": err,
                        "proto": c.get("proto", "?"), "kind": "request", "client": c.get("client", f"load{li}"),
                        "conn": f"{li}:{ci}"})
        for ts, ci, secs, nbytes, ok, pop, err in load.get("downloads", []):
            c = conns.get(ci, {})
            out.append({"ts": ts, "end": ts + secs, "latency_ms": None, "seconds": secs, "bytes": nbytes, "status": 200 if ok else 0,
                        "pop": pop, "error": err, "proto": c.get("proto", "tcp"), "kind": "download",
                        "client": c.get("client", f"load{li}"), "conn": f"{li}:{ci}"})
    out.sort(key=lambda r: r["ts"])
    return out


def _lat(values: list[float]) -> dict[str, Any]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values) if values else None,
            "n": len(values)}


# -- summary ----------------------------------------------------------------------------------------

def flap_summary(flaps: list[dict[str, Any]]) -> dict[str, Any]:
    real = [e for e in flaps if e.get("method") != "drain"]
    drains = [e for e in flaps if e.get("method") == "drain"]
    fib = [float(e["fib_ms"]) for e in real if e.get("fib_ms") is not None]
    return {
        "count": sum(1 for e in real if e.get("action") == "down"),
        "events": len(real),
        "methods": dict(Counter(str(e.get("method")) for e in real if e.get("action") == "down")),
        "pops": dict(Counter(str(e.get("pop")) for e in real if e.get("action") == "down")),
        "failed_commands": sum(1 for e in real if not e.get("ok", True)),
        "fib_ms": {"p50": percentile(fib, 50), "max": max(fib) if fib else None, "missing": sum(1 for e in real if e.get("fib_ms") is None)},
        "drains": len([e for e in drains if e.get("action") == "down"]),
        "log": [{k: e.get(k) for k in ("seq", "ts", "fib_ts", "fib_ms", "method", "pop", "action", "ok", "route_before",
                                      "route_after", "note")} for e in flaps],
    }


def summarize(loads: list[dict[str, Any]], flaps: list[dict[str, Any]], window: float = WINDOW_S,
              external: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """`external`: the runs of clients edgeproxy did not write (lab/external.py), or None when
    they did not run; a failed run fails the verdict unless the survival features were off."""
    windows = flap_windows(flaps, window)
    allrows = rows(loads)
    conns = [c for load in loads for c in load.get("connections", [])]
    report: dict[str, Any] = {"generated": time.time(), "window_s": window, "flaps": flap_summary(flaps)}
    starts = [load["meta"]["started"] for load in loads if load.get("meta", {}).get("started")]
    ends = [load["meta"]["ended"] for load in loads if load.get("meta", {}).get("ended")]
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    report["run"] = {"clients": sorted({str(load.get("meta", {}).get("client", "?")) for load in loads}),
                     "started": min(starts) if starts else None, "ended": max(ends) if ends else None,
                     "duration_s": round(span, 3),
                     "survival_features": all(load.get("meta", {}).get("survival_features", True) for load in loads)}
    failures: list[str] = []
    total_req = 0
    for proto in PROTOS:
        pc = [c for c in conns if c.get("proto") == proto]
        pr = [r for r in allrows if r["proto"] == proto]
        reqs = [r for r in pr if r["kind"] == "request"]
        dls = [r for r in pr if r["kind"] == "download"]
        total_req += len(reqs)
        ok_lat = [r["latency_ms"] for r in reqs if not r["error"]]
        near = [r for r in reqs if in_windows(r["ts"], r["end"], windows)]
        far = [r for r in reqs if not in_windows(r["ts"], r["end"], windows)]
        failed = [r for r in pr if r["error"]]
        by_pop = Counter(r["pop"] or "?" for r in failed)
        entry: dict[str, Any] = {
            "connections": len(pc),
            "survived": sum(1 for c in pc if c.get("survived")),
            "not_survived": [f"{c.get('client')}#{c.get('index')} ({c.get('kind')}): handshakes {c.get('handshakes')}, "
                             f"resets {c.get('resets')}, timeouts {c.get('timeouts')}, closed {c.get('closed')}"
                             for c in pc if not c.get("survived")][:50],
            "handshakes": sum(int(c.get("handshakes", 0)) for c in pc),
            "requests_ok": sum(1 for r in pr if not r["error"]),
            "requests_failed": len(failed),
            "errors": {k: sum(1 for r in failed if r["error"] == k) for k in ERROR_KINDS if any(r["error"] == k for r in failed)},
            "failed_by_pop": dict(by_pop),
            "latency_ms": _lat(ok_lat),
            "latency_ms_after_flap": _lat([r["latency_ms"] for r in near if not r["error"]]),
            "latency_ms_outside_flaps": _lat([r["latency_ms"] for r in far if not r["error"]]),
            "requests_after_flap": len(near),
            "requests_failed_after_flap": sum(1 for r in near if r["error"]),
            "requests_per_s": round(len(reqs) / span, 2) if span > 0 else None,
            "pops_seen": dict(Counter(r["pop"] for r in pr if r["pop"])),
        }
        if dls:
            nbytes = sum(int(r["bytes"]) for r in dls)
            entry["downloads"] = {"count": len(dls), "ok": sum(1 for r in dls if not r["error"]),
                                  "failed": sum(1 for r in dls if r["error"]), "bytes": nbytes,
                                  "mbit_s": round(nbytes * 8 / 1e6 / span, 2) if span > 0 else None}
        report[proto] = entry
        if entry["survived"] < entry["connections"]:
            failures.append(f"{proto}: {entry['connections'] - entry['survived']} of {entry['connections']} connections did not survive")
        if entry["requests_failed"]:
            failures.append(f"{proto}: {entry['requests_failed']} requests failed")
    report["load"] = {"connections": len(conns), "requests": total_req,
                      "requests_per_s": round(total_req / span, 2) if span > 0 else None}
    if not conns:
        failures.append("no load results")
    if external is not None:
        from .external import summarize as external_summary
        ext = external_summary(external)
        report["external_clients"] = ext
        if report["run"]["survival_features"]:
            for name, e in ext.items():
                if e["failed"]:
                    failures.append(f"{name}: {e['failed']} of {e['runs']} runs failed")
    report["ok"] = not failures
    report["failures"] = failures
    return report


def format_summary(r: dict[str, Any]) -> str:
    f = r["flaps"]
    lines = [f"flaps: {f['count']} ({', '.join(f'{k} {v}' for k, v in f['methods'].items()) or 'none'}), drains {f['drains']}, "
             f"FIB p50 {_ms(f['fib_ms']['p50'])} max {_ms(f['fib_ms']['max'])}; load {r['load']['connections']} connections, "
             f"{r['load']['requests_per_s']} req/s over {r['run']['duration_s']:.0f} s"
             + ("" if r["run"]["survival_features"] else " [baseline: --no-survival]")]
    for p in PROTOS:
        e = r[p]
        lat, near, far = e["latency_ms"], e["latency_ms_after_flap"], e["latency_ms_outside_flaps"]
        lines.append(f"{p:<4} connections {e['survived']}/{e['connections']} survived; requests ok {e['requests_ok']} "
                     f"failed {e['requests_failed']} ({', '.join(f'{k} {v}' for k, v in e['errors'].items()) or 'no errors'}); "
                     f"latency p50 {_ms(lat['p50'])} p99 {_ms(lat['p99'])} max {_ms(lat['max'])}; "
                     f"p99 within {r['window_s']:g} s after a flap {_ms(near['p99'])} (n={near['n']}), outside {_ms(far['p99'])}")
        if "downloads" in e:
            d = e["downloads"]
            lines.append(f"     downloads {d['ok']}/{d['count']} complete, {d['bytes'] / 2**20:.0f} MiB, {d['mbit_s']} Mbit/s")
    if "external_clients" in r:
        lines.append("external clients: " + "; ".join(f"{k} {e['ok']}/{e['runs']} ok, {e['failed']} failed"
                                                      for k, e in r["external_clients"].items()))
    lines.append("RESULT: " + ("ok: every connection survived and every request succeeded" if r["ok"] else "FAIL: " + "; ".join(r["failures"])))
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}ms"


# -- HTML -------------------------------------------------------------------------------------------

def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def pop_colours(pops: list[str]) -> dict[str, str]:
    return {p: POP_COLOURS[i % len(POP_COLOURS)] for i, p in enumerate(sorted(set(pops)))}


def segments(conn_rows: list[dict[str, Any]], gap: float = 2.0) -> list[tuple[float, float, str]]:
    """(start, end, pop) runs of one connection's answered requests; a new run on a PoP change or
    a silence longer than `gap` s."""
    out: list[tuple[float, float, str]] = []
    for r in conn_rows:
        if r["error"] or not r["pop"]:
            continue
        if out and out[-1][2] == r["pop"] and r["ts"] - out[-1][1] <= gap:
            out[-1] = (out[-1][0], max(out[-1][1], r["end"]), r["pop"])
        else:
            out.append((r["ts"], r["end"], r["pop"]))
    return out


def sample_points(rs: list[dict[str, Any]], limit: int = MAX_POINTS) -> list[dict[str, Any]]:
    """At most about `limit` requests to plot: every failure and those slower than p99, then an even sample."""
    if len(rs) <= limit:
        return rs
    lat = [r["latency_ms"] for r in rs if r["latency_ms"] is not None]
    p99 = percentile(lat, 99) or math.inf
    keep = [r for r in rs if r["error"] or (r["latency_ms"] or 0) > p99]
    rest = [r for r in rs if not (r["error"] or (r["latency_ms"] or 0) > p99)]
    step = max(1, math.ceil(len(rest) / max(1, limit - len(keep))))
    return sorted(keep + rest[::step], key=lambda r: r["ts"])


def render_svg(loads: list[dict[str, Any]], flaps: list[dict[str, Any]], width: int = 1100) -> str:
    allrows = rows(loads)
    times = [r["ts"] for r in allrows] + [r["end"] for r in allrows] + [float(e["ts"]) for e in flaps if "ts" in e]
    t0, t1 = (min(times), max(times)) if times else (0.0, 1.0)
    if t1 - t0 < 1e-6:
        t1 = t0 + 1.0
    left, right, lane_h, top = 150, 20, 9, 30
    plot_w = width - left - right

    def x(t: float) -> float:
        return round(left + (t - t0) / (t1 - t0) * plot_w, 2)

    by_conn: dict[str, list[dict[str, Any]]] = {}
    meta: dict[str, tuple[str, str, str]] = {}
    for li, load in enumerate(loads):
        for c in load.get("connections", []):
            key = f"{li}:{c['index']}"
            by_conn[key] = []
            meta[key] = (str(c.get("client", "?")), str(c.get("proto", "?")), str(c.get("kind", "rr")))
    for r in allrows:
        by_conn.setdefault(r["conn"], []).append(r)
        meta.setdefault(r["conn"], (r["client"], r["proto"], r["kind"]))
    lanes = sorted(by_conn, key=lambda k: (meta[k][0], meta[k][1], meta[k][2], int(k.split(":")[1])))
    colours = pop_colours([r["pop"] for r in allrows if r["pop"]] + [str(e.get("pop")) for e in flaps if e.get("pop")])
    lat_top = top + len(lanes) * lane_h + 50
    lat_h = 260
    height = lat_top + lat_h + 60
    lo, hi = math.log10(0.3), math.log10(20000)

    def y_lat(ms: float) -> float:
        v = min(max(math.log10(max(ms, 0.3)), lo), hi)
        return round(lat_top + lat_h - (v - lo) / (hi - lo) * lat_h, 2)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" id="timeline" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">']
    out.append(f'<text x="{left}" y="14" font-size="12" font-weight="bold">Which PoP answered each connection '
               f'(one lane per connection; red = failed request)</text>')
    # flap windows and markers first, under the data
    for a, b in flap_windows(flaps):
        out.append(f'<rect class="window" x="{x(a)}" y="{top}" width="{max(0.5, x(b) - x(a))}" height="{height - top - 40}" '
                   f'fill="#f5c6c6" fill-opacity="0.35"/>')
    for e in flaps:
        if "ts" not in e:
            continue
        drain = e.get("method") == "drain"
        colour = "#ff7f0e" if drain else (FAIL_COLOUR if e.get("action") == "down" else "#2ca02c")
        label = f"{e.get('method')} {e.get('pop')} {e.get('action')}"
        fib = f", FIB {e['fib_ms']:.1f} ms" if e.get("fib_ms") is not None else ", no FIB change seen"
        xs = x(float(e["ts"]))
        out.append(f'<line class="{"drain" if drain else "flap"}" data-action="{_esc(e.get("action"))}" x1="{xs}" y1="{top - 4}" '
                   f'x2="{xs}" y2="{height - 40}" stroke="{colour}" stroke-dasharray="4 2">'
                   f'<title>{_esc(label + fib)}</title></line>')
        out.append(f'<text x="{xs + 2}" y="{top - 6}" fill="{colour}" font-size="9">{_esc(e.get("pop"))} {_esc(e.get("action"))}</text>')
    for i, key in enumerate(lanes):
        client, proto, kind = meta[key]
        y = top + i * lane_h
        out.append(f'<g class="lane" data-client="{_esc(client)}" data-proto="{_esc(proto)}" data-conn="{_esc(key)}">')
        out.append(f'<text x="{left - 4}" y="{y + lane_h - 1}" text-anchor="end" font-size="8">{_esc(client)} {_esc(proto)}'
                   f'{" stream" if kind == "stream" else ""} #{_esc(key.split(":")[1])}</text>')
        for a, b, pop in segments(by_conn[key]):
            out.append(f'<rect class="seg" data-pop="{_esc(pop)}" x="{x(a)}" y="{y}" width="{max(0.8, x(b) - x(a))}" '
                       f'height="{lane_h - 2}" fill="{colours.get(pop, "#999")}"><title>{_esc(pop)}: '
                       f'{a - t0:.2f}-{b - t0:.2f} s</title></rect>')
        for r in by_conn[key]:
            if r["error"]:
                out.append(f'<rect class="fail" x="{x(r["ts"])}" y="{y - 1}" width="2" height="{lane_h}" fill="{FAIL_COLOUR}">'
                           f'<title>{_esc(r["error"])} at {r["ts"] - t0:.3f} s (last PoP {_esc(r["pop"] or "?")})</title></rect>')
        out.append("</g>")
    # latency panel
    out.append(f'<text x="{left}" y="{lat_top - 12}" font-size="12" font-weight="bold">Request latency (log scale; '
               f'circles = QUIC, squares = TCP, red = failed, plotted at the top)</text>')
    out.append(f'<rect x="{left}" y="{lat_top}" width="{plot_w}" height="{lat_h}" fill="none" stroke="#ccc"/>')
    for ms in (1, 10, 100, 1000, 10000):
        yy = y_lat(ms)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{yy}" y2="{yy}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{yy + 3}" text-anchor="end">{ms:g} ms</text>')
    reqs = [r for r in allrows if r["kind"] == "request"]
    for r in sample_points(reqs):
        proto = _esc(r["proto"])
        colour = FAIL_COLOUR if r["error"] else colours.get(r["pop"], "#999")
        yy = y_lat(20000 if r["error"] else r["latency_ms"])
        tip = f"{r['client']} {r['proto']} {r['pop'] or '?'} {r['latency_ms']:.1f} ms{' ' + r['error'] if r['error'] else ''}"
        if r["proto"] == "quic":
            out.append(f'<circle class="pt {proto}{" failpt" if r["error"] else ""}" cx="{x(r["ts"])}" cy="{yy}" r="1.6" fill="{colour}">'
                       f'<title>{_esc(tip)}</title></circle>')
        else:
            out.append(f'<rect class="pt {proto}{" failpt" if r["error"] else ""}" x="{x(r["ts"]) - 1.3}" y="{yy - 1.3}" width="2.6" '
                       f'height="2.6" fill="{colour}"><title>{_esc(tip)}</title></rect>')
    # time axis
    axis_y = height - 40
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{axis_y}" y2="{axis_y}" stroke="#333"/>')
    step = _nice_step(t1 - t0)
    k = 0
    while k * step <= (t1 - t0) + 1e-9 and k < 200:
        xs = x(t0 + k * step)
        out.append(f'<line x1="{xs}" x2="{xs}" y1="{axis_y}" y2="{axis_y + 4}" stroke="#333"/>'
                   f'<text x="{xs}" y="{axis_y + 14}" text-anchor="middle">{k * step:g} s</text>')
        k += 1
    # legend
    lx = left
    for pop, colour in colours.items():
        out.append(f'<rect class="legend" x="{lx}" y="{height - 16}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{height - 7}">{_esc(pop)}</text>')
        lx += 60
    out.append(f'<rect x="{lx}" y="{height - 16}" width="10" height="10" fill="{FAIL_COLOUR}"/><text x="{lx + 14}" y="{height - 7}">failed</text>')
    out.append(f'<rect x="{lx + 70}" y="{height - 16}" width="10" height="10" fill="#f5c6c6"/>'
               f'<text x="{lx + 84}" y="{height - 7}">{WINDOW_S:g} s after a flap</text>')
    out.append("</svg>")
    return "\n".join(out)


def _nice_step(span: float) -> float:
    for s in (0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600):
        if span / s <= 12:
            return float(s)
    return 7200.0


_SCRIPT = """
document.querySelectorAll('input[data-proto]').forEach(function (box) {
  box.addEventListener('change', function () {
    var proto = box.getAttribute('data-proto');
    document.querySelectorAll('#timeline .' + proto + ', #timeline g.lane[data-proto="' + proto + '"]').forEach(function (el) {
      el.style.display = box.checked ? '' : 'none';
    });
  });
});
"""


def render_html(report: dict[str, Any], loads: list[dict[str, Any]], flaps: list[dict[str, Any]]) -> str:
    rows_html = []
    for p in PROTOS:
        e = report[p]
        cells = [p, f"{e['survived']}/{e['connections']}", e["requests_ok"], e["requests_failed"],
                 _ms(e["latency_ms"]["p50"]), _ms(e["latency_ms"]["p99"]), _ms(e["latency_ms"]["max"]),
                 _ms(e["latency_ms_after_flap"]["p99"]), _ms(e["latency_ms_after_flap"]["max"]),
                 e["requests_failed_after_flap"], e["requests_per_s"]]
        rows_html.append("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in cells) + "</tr>")
    ext_html = ""
    if "external_clients" in report:
        ext_html = ('<h2>External clients</h2>\n<table id="external"><tr><th>client</th><th>runs</th><th>ok</th><th>failed</th></tr>'
                    + "".join(f"<tr><td>{_esc(k)}</td><td>{e['runs']}</td><td>{e['ok']}</td><td>{e['failed']}</td></tr>"
                              for k, e in report["external_clients"].items()) + "</table>\n")
    verdict = "ok" if report["ok"] else "FAIL: " + "; ".join(report["failures"])
    f = report["flaps"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgeproxy-lab survival report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
.ok {{ color: #2ca02c; }} .fail {{ color: {FAIL_COLOUR}; }}
pre {{ background: #f6f6f6; padding: 0.5em; }}
</style></head>
<body>
<h1>edgeproxy-lab survival report</h1>
<p id="verdict" class="{'ok' if report['ok'] else 'fail'}">{_esc(verdict)}</p>
<p>Clients {_esc(', '.join(report['run']['clients']))}; {report['run']['duration_s']:.0f} s;
{f['count']} flaps ({_esc(', '.join(f'{k} {v}' for k, v in f['methods'].items()) or 'none')}), {f['drains']} drains;
survival features {'on' if report['run']['survival_features'] else 'OFF (baseline)'}.</p>
<table id="summary"><tr><th>protocol</th><th>survived</th><th>requests ok</th><th>failed</th><th>p50</th><th>p99</th><th>max</th>
<th>p99 &le;{report['window_s']:g} s after flap</th><th>max after flap</th><th>failed after flap</th><th>req/s</th></tr>
{''.join(rows_html)}
</table>
{ext_html}<p>Show: <label><input type="checkbox" data-proto="quic" checked> QUIC</label>
<label><input type="checkbox" data-proto="tcp" checked> TCP</label></p>
{render_svg(loads, flaps)}
<h2>Summary</h2>
<pre id="text-summary">{_esc(format_summary(report))}</pre>
<script>{_SCRIPT}</script>
</body></html>
"""


def write_report(out_dir: str | Path, loads: list[dict[str, Any]], flaps: list[dict[str, Any]],
                 window: float = WINDOW_S, external: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = summarize(loads, flaps, window, external)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.html").write_text(render_html(report, loads, flaps))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lab.report")
    p.add_argument("loads", nargs="+", help="load results (JSON from lab.load)")
    p.add_argument("--flaps", help="flaps.jsonl")
    p.add_argument("--out", required=True, help="directory for report.json and report.html")
    p.add_argument("--window", type=float, default=WINDOW_S)
    a = p.parse_args(argv)
    loads = [json.loads(Path(f).read_text()) for f in a.loads]
    report = write_report(a.out, loads, read_jsonl(a.flaps) if a.flaps else [], a.window)
    print(format_summary(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
