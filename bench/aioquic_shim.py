"""Starts aioquic's example HTTP/3 server (examples/http3_server.py from the aioquic sdist) for the
HTTP/3 baseline, without changing its code:

    python bench/aioquic_shim.py EXAMPLES_DIR [http3_server.py arguments...]

Two things differ from running the script directly. The root logger is set to WARNING first, which
turns the example's own `logging.basicConfig(level=INFO)` into a no-op: otherwise the server writes
a log line per request, a cost edgeproxy does not pay with its access log off. And this module
offers `app`, a bare ASGI application answering every request with a small fixed body, which the
example loads through its documented APP argument (`aioquic_shim:app`) to measure the server's
HTTP/3 path without a web framework on top (the demo app is the other baseline).
"""

from __future__ import annotations

import logging
import runpy
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from configs import BODY

_BODY = BODY.encode()
_HEAD = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(_BODY)).encode())],
}


async def app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    await send(_HEAD)
    await send({"type": "http.response.body", "body": _BODY})


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    examples = Path(sys.argv[1])
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # The example imports its demo app as a top-level module, from its own directory.
    sys.path.insert(0, str(examples))
    script = examples / "http3_server.py"
    sys.argv = [str(script), *sys.argv[2:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
