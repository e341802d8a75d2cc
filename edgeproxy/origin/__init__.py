"""Origin backhaul: pooled HTTP/1.1 client connections, origin groups, health checks."""
