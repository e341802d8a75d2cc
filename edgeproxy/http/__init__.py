"""HTTP semantics shared by the HTTP/1.1 and HTTP/3 front ends and the origin client."""
