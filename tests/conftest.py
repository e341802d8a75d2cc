"""Shared fixtures: the HTTP/1.1 front-end suites run once with each parser backend. Also refuses
to run against compiled modules (setup.py) older than their source."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pop_helpers
import pytest
import uvloop

H1_SUITES = {"test_h1_server", "test_cache_pipeline", "test_tls", "test_direct_forward"}


def pytest_configure(config: pytest.Config) -> None:
    # A compiled module is imported in place of its source: an edit would go untested.
    root = Path(__file__).resolve().parent.parent
    stale = [
        str(so.relative_to(root))
        for so in (root / "edgeproxy").rglob("*.cpython-*.so")
        for source in (so.with_name(so.name.split(".", 1)[0] + ".py"), so.with_name(so.name.split(".", 1)[0] + ".c"))
        if source.exists() and source.stat().st_mtime > so.stat().st_mtime
    ]
    if stale:
        pytest.exit(f"compiled modules older than their source: {', '.join(stale)}; rebuild with ./run setup", returncode=4)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in H1_SUITES:
        metafunc.fixturenames.append("h1_parser")
        metafunc.parametrize("h1_parser", ["httptools", "h11"], indirect=True)


@pytest.fixture
def h1_parser(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = pop_helpers.H1_PARSER
    pop_helpers.H1_PARSER = request.param
    yield request.param
    pop_helpers.H1_PARSER = previous


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The tests run on uvloop, the event loop edgeproxy runs on in production."""
    return {"uvloop": uvloop.new_event_loop}
