"""Build step: compiles the HTTP/1.1 request path to C with mypyc.

The modules below are plain, type-checked Python; mypyc turns each into a C extension that sits
next to its source and is imported in its place (about 1.5x on a cache hit or miss, see
`./run bench`), and `edgeproxy/http/_fields.c` is built beside them. Everything else stays
interpreted. `EDGEPROXY_PURE_PYTHON=1` builds without
compiling (no C compiler needed; the same code runs, slower).

mypyc enforces annotations at run time: a value that does not match its declared type raises
TypeError where CPython would carry on, so these modules' annotations must be exact (the test
suite runs against the compiled build).
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

# The request path of a PoP: HTTP/1.1 codecs and protocol, pipeline, cache, origin client and
# pools, metrics and the access log. Order does not matter; they compile as one group.
COMPILED = [
    "edgeproxy/accesslog.py",
    "edgeproxy/cache/policy.py",
    "edgeproxy/cache/store.py",
    "edgeproxy/http/h1fast.py",
    "edgeproxy/http/h1fast_client.py",
    "edgeproxy/http/h1server.py",
    "edgeproxy/http/messages.py",
    "edgeproxy/http/semantics.py",
    "edgeproxy/metrics.py",
    "edgeproxy/origin/client.py",
    "edgeproxy/origin/group.py",
    "edgeproxy/origin/health.py",
    "edgeproxy/origin/pool.py",
    "edgeproxy/pipeline.py",
    "edgeproxy/tick.py",
]


# Written in C: plain HTTP/1.1 field lines tokenised in one call (h1fast, h1fast_client). Without
# it the codecs use llhttp for those heads too.
C_EXTENSIONS = [Extension("edgeproxy.http._fields", ["edgeproxy/http/_fields.c"])]


def ext_modules() -> list[object]:
    if os.environ.get("EDGEPROXY_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    return [*mypycify(COMPILED, opt_level="3"), *C_EXTENSIONS]


setup(ext_modules=ext_modules())
