"""The kernel side of the flow map: one in-process libnftables context (netlink), fed batches.

No process is started per flow or per batch: :class:`Nft` loads ``libnftables.so.1`` (Debian
package ``libnftables1``, pulled in by ``nftables``) once and keeps one context; every batch is
one call of ``nft_run_cmd_from_buffer``, which the library turns into one netlink transaction
(all of a batch applies, or none of it). Calls block, so :class:`edgeproxy.steering.service.Steering`
runs them on one worker thread (ctypes releases the GIL for the call).

The table is ours alone: ``inet edgeproxy_<pop>`` with the map ``flows4`` and one prerouting
chain at mangle priority that marks TCP segments found in the map. Segments arriving from the
backhaul are never marked (two PoPs that disagree about an owner cannot bounce a segment
between them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import threading

from .projection import MAP4

FAMILY = "inet"
CHAIN = "prerouting"


class NftError(Exception):
    pass


def table_name(pop: str) -> str:
    """``edgeproxy_<pop>``, with characters nft identifiers do not take replaced by ``_``."""
    return "edgeproxy_" + re.sub(r"[^A-Za-z0-9_]", "_", pop)


def ruleset(table: str, *, size: int, exclude_ifaces: list[str]) -> str:
    guard = ""
    names = [i for i in exclude_ifaces if i]
    if names:
        guard = "iifname != { " + ", ".join(f'"{n}"' for n in names) + " } "
    return (
        f"table {FAMILY} {table} {{\n"
        f"  map {MAP4} {{\n"
        "    type ipv4_addr . inet_service . ipv4_addr . inet_service : mark\n"
        f"    size {size}\n"
        "  }\n"
        f"  chain {CHAIN} {{\n"
        "    type filter hook prerouting priority mangle; policy accept;\n"
        f"    {guard}meta l4proto tcp meta mark set ip saddr . tcp sport . ip daddr . tcp dport map @{MAP4} counter\n"
        "  }\n"
        "}\n"
    )


class Nft:
    """One libnftables context; :meth:`run` is thread-safe (calls are serialised)."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise NftError(f"cannot load libnftables ({e}); apt-get install nftables") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(0)
        if not self._ctx:
            raise NftError("nft_ctx_new failed")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._lock = threading.Lock()
        self.calls = 0

    def run(self, commands: str) -> str:
        """Runs ``commands`` as one transaction; returns the output, raises NftError."""
        with self._lock:
            if self._ctx is None:
                raise NftError("closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
            self.calls += 1
        if rc != 0:
            raise NftError(err.strip()[:2000] or f"nft failed (rc {rc})")
        return out

    def try_run(self, commands: str) -> str | None:
        try:
            return self.run(commands)
        except NftError:
            return None

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


def steered_counter(chain_listing: str) -> tuple[int, int]:
    """(packets, bytes) of the marking rule's counter in ``list chain`` output."""
    m = re.search(r"counter packets (\d+) bytes (\d+)", chain_listing)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
