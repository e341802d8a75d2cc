"""edgeproxy: an anycast edge proxy whose QUIC and TCP connections survive BGP route flaps."""

__version__ = "0.1.0"

from . import timeout_backport  # noqa: F401  (asyncio fix for Python 3.11.0-3.11.2)
