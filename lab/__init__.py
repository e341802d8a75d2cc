"""lab: network-namespace anycast lab with real BGP, route flaps, load and a survival report."""

import edgeproxy.timeout_backport  # noqa: F401  (asyncio fix for Python 3.11.0-3.11.2)
