"""edgeproxy: an anycast edge proxy whose QUIC and TCP connections survive BGP route flaps."""

__version__ = "0.1.0"
