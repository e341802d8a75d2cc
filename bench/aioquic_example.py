"""Fetches aioquic's example HTTP/3 server for the HTTP/3 baseline.

The example (examples/http3_server.py and its demo ASGI app) ships in aioquic's sdist, not in the
wheel edgeproxy installs, so it is downloaded at bench time with pip, for exactly the aioquic
version installed in this virtualenv, and unpacked under bench/.cache/ (never committed). Its extra
imports (wsproto for the server; starlette and jinja2 for the demo app) are installed into a
separate --target directory there too, so the project's virtualenv is left as it is while the
server still runs on the same interpreter, aioquic build and uvloop as edgeproxy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from harness import BenchError

# Pinned so the baseline does not drift between bench runs; --no-deps with the full closure
# because h11 and typing_extensions already come from the project's virtualenv.
EXAMPLE_DEPS = [
    "wsproto==1.3.2",
    "starlette==1.10.0",
    "anyio==4.16.0",
    "idna==3.20",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
]


@dataclass(frozen=True)
class AioquicExample:
    version: str
    examples: Path  # holds http3_server.py and demo.py
    site: Path  # the example's extra packages


def _pip(args: list[str], what: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise BenchError(f"pip could not {what}:\n{tail}")


def prepare(cache: Path) -> AioquicExample:
    """Downloads and unpacks once per aioquic version; later runs reuse the cache."""
    try:
        version = metadata.version("aioquic")
    except metadata.PackageNotFoundError as e:
        raise BenchError("aioquic is not installed in this virtualenv") from e
    cache.mkdir(parents=True, exist_ok=True)
    # Self-ignoring, as virtualenvs do: nothing fetched here can end up in a commit.
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    root = cache / f"aioquic-{version}"
    examples, site = root / "examples", root / "site"
    done = root / ".ready"
    if done.exists() and (examples / "http3_server.py").exists():
        return AioquicExample(version, examples, site)

    shutil.rmtree(root, ignore_errors=True)
    sdists = cache / "sdist"
    sdists.mkdir(parents=True, exist_ok=True)
    archive = sdists / f"aioquic-{version}.tar.gz"
    if not archive.exists():
        print(f"bench: downloading the aioquic {version} sdist for its example server", flush=True)
        _pip(["download", "--no-binary", ":all:", "--no-deps", f"aioquic=={version}", "-d", str(sdists)], f"download aioquic=={version}")
    if not archive.exists():
        raise BenchError(f"pip reported success but {archive} is missing")

    prefix = f"aioquic-{version}/examples/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BenchError(f"{archive} has no {prefix}")
        root.mkdir(parents=True)
        for m in members:
            m.name = m.name[len(f"aioquic-{version}/") :]
            # What the "data" filter refuses, checked here too: Debian's Python 3.11.2 predates
            # extraction filters (3.11.4).
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                raise BenchError(f"{archive}: refusing to extract {m.name!r}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, members=members, filter="data")
        else:
            tar.extractall(root, members=members)

    print("bench: installing the example server's own dependencies under bench/.cache", flush=True)
    _pip(["install", "-q", "--no-deps", "--target", str(site), *EXAMPLE_DEPS], "install the example's dependencies")
    done.write_text(version + "\n")
    return AioquicExample(version, examples, site)
