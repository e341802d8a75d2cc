"""lab/report.py on synthetic load results and flap logs: the summary figures (survival, failures,
latency overall and within 1 s after a flap) and the self-contained HTML timeline (parsed, since no
headless browser is installed)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from lab import report
from lab.load_stats import Accounting

T0 = 1_700_000_000.0
SVG = "{http://www.w3.org/2000/svg}"


def synthetic_load(client: str = "c1") -> dict[str, Any]:
    """2 QUIC connections (one survives), 2 TCP (one reset by the flap at T0+10), 1 download
    connection; requests every 0.5 s for 20 s, slow right after the flap."""
    acc = Accounting(client)
    q1, q2 = acc.new_conn("quic", "rr"), acc.new_conn("quic", "rr")
    t1, t2 = acc.new_conn("tcp", "rr"), acc.new_conn("tcp", "rr")
    s1 = acc.new_conn("tcp", "stream")
    for c in (q1, q2, t1, t2, s1):
        acc.handshake(c)
    for i in range(40):
        ts = T0 + i * 0.5
        pop = "p1" if ts < T0 + 10 or ts >= T0 + 14 else "p2"
        near = T0 + 10 <= ts < T0 + 11
        acc.request(q1, ts, 50.0 if near else 2.0, 200, pop)
        if ts == T0 + 10:
            acc.request(q2, ts, 5000.0, 0, "", "timeout")
            acc.conn_error(q2, ts + 5, "timeout", "no answer")
            acc.handshake(q2)
        else:
            acc.request(q2, ts, 3.0, 200, pop)
        acc.request(t1, ts, 1.0, 200, pop)
        if ts == T0 + 10:
            acc.request(t2, ts, 0.4, 0, "", "reset")
            acc.conn_error(t2, ts, "reset", "ConnectionResetError")
            acc.handshake(t2)
        else:
            acc.request(t2, ts, 1.5, 200, pop)
    acc.download(s1, T0, 2.0, 4 << 20, "p1")
    acc.download(s1, T0 + 2, 1.0, 1 << 20, "p1", "reset")
    acc.conn_error(s1, T0 + 3, "reset", "ConnectionResetError")
    meta = {"client": client, "started": T0, "ended": T0 + 20, "survival_features": True}
    return acc.to_json(meta, 20.0)


FLAPS = [
    {"seq": 0, "ts": T0 + 10.0, "fib_ts": T0 + 10.003, "fib_ms": 3.0, "method": "withdraw", "pop": "p1", "action": "down", "ok": True},
    {"seq": 1, "ts": T0 + 14.0, "fib_ts": T0 + 14.005, "fib_ms": 5.0, "method": "withdraw", "pop": "p1", "action": "up", "ok": True},
    {"seq": 2, "ts": T0 + 17.0, "fib_ts": None, "fib_ms": None, "method": "drain", "pop": "p3", "action": "down", "ok": True},
]


def test_flap_windows_merge_and_use_fib_time() -> None:
    w = report.flap_windows([{"ts": 10.0, "fib_ts": 10.5}, {"ts": 11.0, "fib_ts": None}, {"ts": 20.0}])
    assert w == [(10.0, 12.0), (20.0, 21.0)]
    assert report.in_windows(9.0, 10.1, w) and not report.in_windows(12.5, 13.0, w)


def test_summary_figures() -> None:
    r = report.summarize([synthetic_load()], FLAPS)
    assert r["flaps"]["count"] == 1 and r["flaps"]["events"] == 2
    assert r["flaps"]["methods"] == {"withdraw": 1} and r["flaps"]["drains"] == 1
    assert r["flaps"]["fib_ms"]["max"] == 5.0
    q, t = r["quic"], r["tcp"]
    assert (q["connections"], q["survived"]) == (2, 1)
    assert (t["connections"], t["survived"]) == (3, 1)  # the reset one and the download one did not
    assert q["requests_failed"] == 1 and q["errors"] == {"timeout": 1}
    assert t["requests_failed"] == 2 and t["errors"] == {"reset": 2}
    assert q["requests_ok"] == 79 and t["requests_ok"] == 79 + 1
    assert t["failed_by_pop"] == {"p1": 2}  # the last PoP that answered on the connection
    assert q["latency_ms"]["max"] == 50.0 and q["latency_ms"]["p50"] in (2.0, 3.0)
    # within 1 s after the flap at T0+10 (to T0+11.003): the slow answers; outside: fast only
    assert q["latency_ms_after_flap"]["max"] == 50.0
    assert q["latency_ms_outside_flaps"]["max"] == 3.0
    assert q["requests_failed_after_flap"] == 1
    assert t["downloads"] == {"count": 2, "ok": 1, "failed": 1, "bytes": 5 << 20, "mbit_s": round((5 << 20) * 8 / 1e6 / 20, 2)}
    assert r["load"]["connections"] == 5 and r["load"]["requests_per_s"] == 8.0
    assert not r["ok"] and any("did not survive" in f for f in r["failures"])
    text = report.format_summary(r)
    assert "quic connections 1/2 survived" in text and "RESULT: FAIL" in text


def test_clean_run_is_ok() -> None:
    acc = Accounting("c1")
    c = acc.new_conn("tcp", "rr")
    acc.handshake(c)
    for i in range(10):
        acc.request(c, T0 + i, 1.0 + i, 200, "p1")
    r = report.summarize([acc.to_json({"client": "c1", "started": T0, "ended": T0 + 10}, 10.0)], [])
    assert r["ok"] and r["failures"] == []
    assert r["tcp"]["latency_ms"] == {"p50": 5.0, "p99": 10.0, "max": 10.0, "n": 10}
    assert r["tcp"]["latency_ms_after_flap"]["n"] == 0 and r["tcp"]["latency_ms_after_flap"]["p99"] is None
    assert r["quic"]["connections"] == 0
    assert report.summarize([], [])["ok"] is False  # no load at all is not a pass


def test_segments_split_on_pop_change_and_silence() -> None:
    rs = [{"ts": 0.0, "end": 0.1, "pop": "p1", "error": ""}, {"ts": 1.0, "end": 1.1, "pop": "p1", "error": ""},
          {"ts": 1.5, "end": 1.6, "pop": "", "error": "reset"}, {"ts": 2.0, "end": 2.1, "pop": "p2", "error": ""},
          {"ts": 9.0, "end": 9.1, "pop": "p2", "error": ""}]
    assert report.segments(rs) == [(0.0, 1.1, "p1"), (2.0, 2.1, "p2"), (9.0, 9.1, "p2")]


def test_sample_points_keeps_failures_and_slow_requests() -> None:
    rs = [{"ts": float(i), "latency_ms": 1.0, "error": ""} for i in range(10_000)]
    rs[5000] = {"ts": 5000.0, "latency_ms": 0.0, "error": "reset"}
    rs[7000]["latency_ms"] = 900.0
    s = report.sample_points(rs, limit=500)
    assert len(s) <= 700 and rs[5000] in s and rs[7000] in s


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained_and_shows_the_timeline(tmp_path: Path) -> None:
    loads = [synthetic_load("c1"), synthetic_load("c2")]
    r = report.write_report(tmp_path, loads, FLAPS)
    assert json.loads((tmp_path / "report.json").read_text())["quic"]["connections"] == 4 == r["quic"]["connections"]
    page = (tmp_path / "report.html").read_text()
    p = _Collect()
    p.feed(page)
    tags = [t for t, _ in p.tags]
    assert tags.count("svg") == 1 and "script" in tags and "table" in tags
    # nothing loaded from elsewhere: no src/href attributes, no external URLs besides the SVG namespace
    assert not any(k in ("src", "href") for _, attrs in p.tags for k in attrs)
    assert page.replace("http://www.w3.org/2000/svg", "").count("http") == 0
    svg = ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])  # well-formed XML
    lanes = svg.findall(f"{SVG}g[@class='lane']")
    assert len(lanes) == 10 and {g.get("data-client") for g in lanes} == {"c1", "c2"}
    segs = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "seg"]
    assert {e.get("data-pop") for e in segs} == {"p1", "p2"}
    # the surviving QUIC connection of c1 was served by p1, then p2, then p1 again
    q1 = next(g for g in lanes if g.get("data-client") == "c1" and g.get("data-conn") == "0:0")
    assert [e.get("data-pop") for e in q1.iter(f"{SVG}rect") if e.get("class") == "seg"] == ["p1", "p2", "p1"]
    flap_lines = [e for e in svg.iter(f"{SVG}line") if e.get("class") == "flap"]
    assert [e.get("data-action") for e in flap_lines] == ["down", "up"]
    assert len([e for e in svg.iter(f"{SVG}line") if e.get("class") == "drain"]) == 1
    fails = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "fail"]
    assert len(fails) == 2 * 3  # per client: a QUIC timeout, a TCP reset, a failed download
    points = [e for e in svg.iter() if (e.get("class") or "").startswith("pt ")]
    assert len(points) == 2 * 160 and sum("failpt" in (e.get("class") or "") for e in points) == 4
    windows = [e for e in svg.iter(f"{SVG}rect") if e.get("class") == "window"]
    assert len(windows) == 3
    assert "RESULT: FAIL" in page


def test_report_cli(tmp_path: Path) -> None:
    f = tmp_path / "c1.json"
    f.write_text(json.dumps(synthetic_load()))
    flaps = tmp_path / "flaps.jsonl"
    flaps.write_text("".join(json.dumps(e) + "\n" for e in FLAPS) + "{not json\n")
    assert report.read_jsonl(flaps) == FLAPS
    assert report.main([str(f), "--flaps", str(flaps), "--out", str(tmp_path / "out")]) == 1
    assert (tmp_path / "out" / "report.html").exists()


EXTERNAL = [
    {"client": "gtlsclient", "start": T0 + 1, "end": T0 + 4, "ok": True, "detail": "20971520 bytes"},
    {"client": "curl", "start": T0 + 4, "end": T0 + 5, "ok": True, "detail": "200 20971520 bytes"},
    {"client": "gtlsclient", "start": T0 + 5, "end": T0 + 15, "ok": False, "detail": "short file: 1048576 of 20971520 bytes"},
    {"client": "curl", "start": T0 + 15, "end": T0 + 16, "ok": True, "detail": "200 20971520 bytes"},
]


def _clean_load() -> dict[str, Any]:
    acc = Accounting("c1")
    c = acc.new_conn("tcp", "rr")
    acc.handshake(c)
    for i in range(10):
        acc.request(c, T0 + i, 1.0, 200, "p1")
    return acc.to_json({"client": "c1", "started": T0, "ended": T0 + 10}, 10.0)


def test_external_clients_counted_and_gate_the_verdict(tmp_path: Path) -> None:
    r = report.summarize([_clean_load()], [], external=EXTERNAL)
    assert r["external_clients"] == {"gtlsclient": {"runs": 2, "ok": 1, "failed": 1}, "curl": {"runs": 2, "ok": 2, "failed": 0}}
    assert not r["ok"] and r["failures"] == ["gtlsclient: 1 of 2 runs failed"]
    assert "external clients: gtlsclient 1/2 ok, 1 failed; curl 2/2 ok, 0 failed" in report.format_summary(r)
    ok = report.summarize([_clean_load()], [], external=[e for e in EXTERNAL if e["ok"]])
    assert ok["ok"] and ok["external_clients"]["gtlsclient"] == {"runs": 1, "ok": 1, "failed": 0}
    # not run at all: no entry, no effect; the baseline (survival features off) is not failed by them
    assert "external_clients" not in report.summarize([_clean_load()], [])
    base = _clean_load()
    base["meta"]["survival_features"] = False
    assert report.summarize([base], [], external=EXTERNAL)["ok"]
    report.write_report(tmp_path, [_clean_load()], [], external=EXTERNAL)
    page = (tmp_path / "report.html").read_text()
    p = _Collect()
    p.feed(page)
    assert ("table", {"id": "external"}) in p.tags and "<td>gtlsclient</td><td>2</td><td>1</td><td>1</td>" in page
    assert json.loads((tmp_path / "report.json").read_text())["external_clients"]["curl"]["runs"] == 2


def test_external_judgements() -> None:
    from lab import external

    want = 20 << 20
    assert external.judge_gtls(0, [want], want, False, "") == (True, f"{want} bytes")
    assert external.judge_gtls(0, [want - 1], want, False, "")[0] is False
    assert external.judge_gtls(1, [want], want, False, "boom")[0] is False
    assert external.judge_gtls(-1, [want], want, True, "")[0] is False
    assert external.judge_curl(0, f"200 {want}", want, False, "")[0] is True
    assert external.judge_curl(0, f"502 {want}", want, False, "")[0] is False
    assert external.judge_curl(0, "200 5", want, False, "")[0] is False
    assert external.judge_curl(28, "200 5", want, True, "timeout")[0] is False
    argv = external.gtls_argv("203.0.113.1", 20, Path("/tmp/x"), 10)
    assert argv[:4] == ["gtlsclient", "--exit-on-all-streams-close", "--no-quic-dump", "--no-http-dump"]
    assert argv[-3:] == ["203.0.113.1", "443", "https://203.0.113.1/stream?mb=20"]
