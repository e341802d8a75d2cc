"""Shared fixtures: the HTTP/1.1 front-end suites run once with each parser backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pop_helpers
import pytest
import uvloop

H1_SUITES = {"test_h1_server", "test_cache_pipeline", "test_tls"}


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
