"""lab: network-namespace anycast lab with real BGP, route flaps, load and a survival report."""
