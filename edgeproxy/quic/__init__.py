"""QUIC datagram path: edgeproxy's own dispatcher in front of aioquic connections."""
