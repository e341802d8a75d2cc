"""TCP steering: segments of flows another PoP owns are forwarded there by the kernel.

See :mod:`edgeproxy.steering.service` (the whole), :mod:`.projection` (flow table -> nft map
updates, pure), :mod:`.nft` (libnftables), :mod:`.routing` (ip rules, routes, VXLAN, sysctls)
and :mod:`.publisher` (this PoP's connections -> the flow table).
"""
