"""Edge cache: RFC 9111 shared-cache policy (sans-IO) and the byte-bounded memory store."""
