"""LZW compatible with Go's ``compress/lzw`` in LSB order with 8-bit literals.

memberlist wraps compressed payloads in ``compress{Algo: 0, Buf}`` where ``Buf`` comes from
``lzw.NewWriter(w, lzw.LSB, 8)``. Go's writer is deterministic, and this module reproduces its
output bit for bit:

* codes 0-255 are literals, 256 is *clear*, 257 is *end of stream*;
* codes are packed least-significant-bit first and start 9 bits wide;
* the writer sends *clear* first, then one code per longest match, assigning table entries
  258, 259, ... as it goes;
* when the entry counter reaches 512, 1024 or 2048 every later code is one bit wider (at most 12);
* when the counter reaches 4095 the writer sends *clear* (still 12 bits wide) and restarts with an
  empty table at 9 bits;
* ``Close`` sends the pending code (with the same counter step), then *end*, then zero-pads the
  final byte.

The reader mirrors Go's ``lzw.Reader``: a stream must end with the *end* code (trailing bytes after
it are ignored), and any code above the next table slot is invalid. Inflation is capped because a
few kilobytes of codes can expand to gigabytes (memberlist fixed the same hole in 7de15ac).
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_OUTPUT", "LZWError", "compress", "decompress"]

_LIT_WIDTH = 8
_CLEAR = 1 << _LIT_WIDTH  # 256
_EOF = _CLEAR + 1  # 257
_MAX_WIDTH = 12
_MAX_CODE = (1 << _MAX_WIDTH) - 1  # 4095

#: Default inflation cap, the same as memberlist HEAD's.
DEFAULT_MAX_OUTPUT = 40 * 1024 * 1024


class LZWError(ValueError):
    """Malformed or oversized LZW input. ``reason`` is ``bad_lzw`` or ``oversized``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def compress(data: bytes | bytearray | memoryview) -> bytes:
    """Compress ``data`` exactly as Go's ``lzw.NewWriter(w, lzw.LSB, 8)`` + ``Write`` + ``Close``."""
    src = bytes(data)
    out = bytearray()
    bits = 0
    nbits = 0
    width = _LIT_WIDTH + 1
    hi = _EOF
    overflow = _CLEAR << 1
    table: dict[int, int] = {}

    # The starting clear code (9 bits wide).
    bits |= _CLEAR << nbits
    nbits += width
    while nbits >= 8:
        out.append(bits & 0xFF)
        bits >>= 8
        nbits -= 8

    if src:
        code = src[0]
        for i in range(1, len(src)):
            lit = src[i]
            key = (code << 8) | lit
            nxt = table.get(key)
            if nxt is not None:
                code = nxt
                continue
            # Emit the longest match; the literal starts the next one.
            bits |= code << nbits
            nbits += width
            while nbits >= 8:
                out.append(bits & 0xFF)
                bits >>= 8
                nbits -= 8
            code = lit
            hi += 1
            if hi == overflow:
                width += 1
                overflow <<= 1
            if hi == _MAX_CODE:
                bits |= _CLEAR << nbits
                nbits += width
                while nbits >= 8:
                    out.append(bits & 0xFF)
                    bits >>= 8
                    nbits -= 8
                width = _LIT_WIDTH + 1
                hi = _EOF
                overflow = _CLEAR << 1
                table.clear()
                continue
            table[key] = hi
        # Close: the pending code, the counter step, then EOF.
        bits |= code << nbits
        nbits += width
        while nbits >= 8:
            out.append(bits & 0xFF)
            bits >>= 8
            nbits -= 8
        hi += 1
        if hi == overflow:
            width += 1
            overflow <<= 1
        if hi == _MAX_CODE:
            bits |= _CLEAR << nbits
            nbits += width
            while nbits >= 8:
                out.append(bits & 0xFF)
                bits >>= 8
                nbits -= 8
            width = _LIT_WIDTH + 1

    bits |= _EOF << nbits
    nbits += width
    while nbits >= 8:
        out.append(bits & 0xFF)
        bits >>= 8
        nbits -= 8
    if nbits > 0:
        out.append(bits & 0xFF)
    return bytes(out)


def decompress(data: bytes | bytearray | memoryview, max_output: int = DEFAULT_MAX_OUTPUT) -> bytes:
    """Inflate a Go ``compress/lzw`` (LSB, 8-bit literal) stream.

    Raises :class:`LZWError` (``bad_lzw``) on an invalid code or a stream without its end code,
    and (``oversized``) when the output would exceed ``max_output`` bytes.
    """
    src = bytes(data)
    n = len(src)
    out = bytearray()
    # entries[c] is the expansion of code c; codes above `hi` are never read, so the table need
    # not be cleared on a clear code (Go does not clear it either).
    entries: list[bytes] = [bytes((i,)) for i in range(_CLEAR)] + [b""] * (_MAX_CODE + 1 - _CLEAR)
    bits = 0
    nbits = 0
    pos = 0
    width = _LIT_WIDTH + 1
    hi = _EOF
    overflow = 1 << width
    last = -1
    while True:
        while nbits < width:
            if pos >= n:
                raise LZWError("bad_lzw", "stream ends without an end code")
            bits |= src[pos] << nbits
            pos += 1
            nbits += 8
        code = bits & ((1 << width) - 1)
        bits >>= width
        nbits -= width

        if code < _CLEAR:
            entry = entries[code]
        elif code == _CLEAR:
            width = _LIT_WIDTH + 1
            hi = _EOF
            overflow = 1 << width
            last = -1
            continue
        elif code == _EOF:
            return bytes(out)
        elif code <= hi:
            if code == hi and last >= 0:
                prev = entries[last]
                entry = prev + prev[:1]
            else:
                entry = entries[code]
        else:
            raise LZWError("bad_lzw", f"invalid code {code} (next slot {hi})")

        if len(out) + len(entry) > max_output:
            raise LZWError("oversized", f"inflates beyond {max_output} bytes")
        out += entry
        if last >= 0:
            entries[hi] = entries[last] + entry[:1]
        last = code
        hi += 1
        if hi >= overflow:
            if width == _MAX_WIDTH:
                # The table is full: no new entries until the next clear code.
                last = -1
                hi -= 1
            else:
                width += 1
                overflow = 1 << width
