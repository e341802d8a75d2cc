"""This node's QUIC identity: the QUIC-LB server ID its connection IDs carry, and the fleet keys
behind its connection IDs and stateless reset tokens.

A *node* is one worker process: server ID = PoP index || host index || worker index, packed by
`lb.ServerIdLayout` (the PoP index is a prefix, so a PoP can route on it alone). Every CID this
node issues - the first one and every NEW_CONNECTION_ID one, see `EdgeQuicConnection` - is a
QUIC-LB CID for that server ID, so any PoP (and any worker) can tell who owns a packet from its
Destination CID alone and forward it there.

Keys:

* QUIC-LB: every live fleet key has its own QUIC-LB configuration, config id
  ``(quic_lb.config_id + key id) mod 7`` (`lb_config_id`) with the key
  ``HKDF-SHA256(that key's secret, info="edgeproxy quic-lb" || config id)``, 16 bytes; every PoP
  with the same fleet key file derives the same ones. CIDs are issued under the primary key's
  configuration and decoded under any live one, so a key rotation (add everywhere, promote,
  remove: see `fleet`) never leaves PoPs that switched at different moments unable to route
  each other's CIDs. Live key ids differ mod 7 (`fleet.FleetKeys` enforces it), so each has
  its own config id. ``encrypt = false`` selects the draft's plaintext algorithm instead (one config,
  ``quic_lb.config_id``; server ID visible on the wire, for debugging and lab captures).
* Stateless reset tokens: ``fleet.FleetKeys.reset_token(cid)`` (HMAC of the CID under the
  fleet's reset sub-key) of the key the CID's config id names, so the PoP a dead owner's
  packets reach computes the token the client holds, whichever key is primary by then. CIDs
  are never reused under one key: nonces come from the codec's counter (`lb.QuicLBCodec`), per
  process, and the worker index in the server ID keeps processes apart.

`ServerIdentity.sync_keys` follows a reloaded key file (SIGHUP) without a restart.

When the codec cannot encode (nonce space exhausted, no current config) the node issues
unroutable 0b111 CIDs of the same length; the dispatcher publishes those in the flow table.

`load_fleet_keys` reads the fleet key file, creating one (mode 0600) in the PoP's state
directory when none is configured: a single PoP then works out of the box, and a fleet copies
one file to every PoP.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .fleet import FleetKey, FleetKeyError, FleetKeys, build_stateless_reset
from .lb import (
    KEY_LENGTH,
    Decoded,
    LBConfig,
    NoCurrentConfigError,
    NonceExhaustedError,
    QuicLBCodec,
    ServerIdLayout,
    unroutable_cid,
)

if TYPE_CHECKING:
    from ..config import Config, QuicLBSection

__all__ = [
    "DEFAULT_KEY_FILE",
    "LBParams",
    "ServerIdentity",
    "build_identity",
    "lb_config_id",
    "load_fleet_keys",
    "node_name",
    "quic_lb_key",
]

NodeId = tuple[int, int, int]
DEFAULT_KEY_FILE = "fleet-keys.toml"
_QUIC_LB_LABEL = b"edgeproxy quic-lb"


def lb_config_id(base: int, key_id: int) -> int:
    """The QUIC-LB config id of fleet key `key_id` (7 is reserved for unroutable CIDs)."""
    return (base + key_id) % 7


def quic_lb_key(key: FleetKey, config_id: int) -> bytes:
    """The QUIC-LB AES-128 key of `config_id`, derived from the fleet key's secret."""
    return HKDF(
        algorithm=SHA256(), length=KEY_LENGTH, salt=None, info=_QUIC_LB_LABEL + bytes((config_id,))
    ).derive(key.secret)


@dataclass(frozen=True, slots=True)
class LBParams:
    """What a node's QUIC-LB configurations are made of, besides the fleet keys."""

    base: int  # quic_lb.config_id
    server_id_len: int
    nonce_len: int
    encrypt: bool

    def configs(self, keys: FleetKeys) -> tuple[dict[int, LBConfig], dict[int, int], int]:
        """(config id -> LBConfig, config id -> fleet key id, the primary's config id). Live
        key ids differ mod 7 (`FleetKeys` refuses anything else), so config ids never clash."""
        if not self.encrypt:
            config = LBConfig(self.base, self.server_id_len, self.nonce_len)
            return {self.base: config}, {}, self.base
        configs: dict[int, LBConfig] = {}
        key_of: dict[int, int] = {}
        for key_id, key in sorted(keys.keys.items()):
            cid = lb_config_id(self.base, key_id)
            key_of[cid] = key_id
            configs[cid] = LBConfig(
                cid, self.server_id_len, self.nonce_len, key=quic_lb_key(key, cid)
            )
        return configs, key_of, lb_config_id(self.base, keys.primary.key_id)


def node_name(pop_id: str, host: int, worker: int) -> str:
    """A node's owner name in the flow table: the PoP id, with "/host/worker" unless both are
    0 (so a one-process PoP is simply its PoP id)."""
    return pop_id if host == 0 and worker == 0 else f"{pop_id}/{host}/{worker}"


@dataclass(frozen=True, slots=True)
class _Owner:
    """Cache entry: the node a decoded server ID names (None: padding bits set, garbage)."""

    node: NodeId | None


class ServerIdentity:
    """Connection IDs and reset tokens of one node; also the routing view of everyone's CIDs.

    Implements the dispatcher's `ConnectionIdentity`: `new_cid`, `reset_token` and
    `stateless_reset` for this node's connections, `owner_of` and `cid_length_for` for routing.
    """

    def __init__(
        self,
        *,
        codec: QuicLBCodec,
        layout: ServerIdLayout,
        node: NodeId,
        keys: FleetKeys,
        urandom: Callable[[int], bytes] = os.urandom,
        lb_params: LBParams | None = None,
    ) -> None:
        """`lb_params` (set by `build_identity`) ties the codec's configurations to the fleet
        keys: reset tokens then use the key of a CID's config, and `sync_keys` works."""
        current = codec.current
        if current is None:
            raise ValueError("the QUIC-LB codec needs a current configuration")
        if current.server_id_len != layout.server_id_len:
            raise ValueError(
                f"server_id_len {current.server_id_len} of the QUIC-LB config does not match "
                f"the {layout.server_id_len} octets of the server ID layout"
            )
        self.codec = codec
        self.layout = layout
        self._node = node
        self.keys = keys
        self.server_id = layout.pack(*node)
        self._cid_length = current.cid_len
        self._urandom = urandom
        # Server IDs of live nodes are few; decoded ones are cached so that routing a
        # datagram costs one codec decode plus a dict lookup.
        self._owners: dict[bytes, _Owner] = {}
        self._lb_params = lb_params
        self._key_of_config: dict[int, int] = {}
        if lb_params is not None:
            self._key_of_config = lb_params.configs(keys)[1]

    @property
    def node(self) -> NodeId:
        return self._node

    @property
    def cid_length(self) -> int:
        return self._cid_length

    @property
    def sender(self) -> bytes:
        """This node's name in backhaul frames: its server ID."""
        return self.server_id

    # -- issuing -------------------------------------------------------------------------------

    def new_cid(self) -> bytes:
        """A fresh CID naming this node (an unroutable one if the codec cannot encode)."""
        try:
            return self.codec.encode(self.server_id)
        except (NonceExhaustedError, NoCurrentConfigError):
            return unroutable_cid(self._cid_length)

    def reset_token(self, cid: bytes) -> bytes:
        """The token of `cid` under the fleet key its config id names (else the primary)."""
        key_id = self._key_of_config.get(cid[0] >> 5) if cid else None
        if key_id is not None and self.keys.get(key_id) is not None:
            return self.keys.reset_token(cid, key_id=key_id)
        return self.keys.reset_token(cid)

    def stateless_reset(self, cid: bytes, trigger_len: int) -> bytes | None:
        return build_stateless_reset(self.reset_token(cid), trigger_len, self._urandom)

    def sync_keys(self) -> None:
        """Follow the fleet keys (after `FleetKeys.replace`): a configuration per live key,
        issuing under the primary's; configurations of removed keys stop decoding."""
        params = self._lb_params
        if params is None:
            return
        configs, key_of, current = params.configs(self.keys)
        codec = self.codec
        for cid, live in list(codec.configs.items()):
            if configs.get(cid) != live:
                codec.remove_config(cid)
        for cid, config in configs.items():
            if cid not in codec.configs:
                codec.add_config(config)
        codec.set_current(current)
        self._key_of_config = key_of
        self._owners.clear()

    # -- routing -------------------------------------------------------------------------------

    def cid_length_for(self, first_octet: int) -> int | None:
        return self.codec.cid_length_for(first_octet)

    def owner_of(self, cid: bytes) -> NodeId | None:
        decoded = self.codec.decode(cid, with_nonce=False)
        if not isinstance(decoded, Decoded):
            return None
        sid = decoded.server_id
        owner = self._owners.get(sid)
        if owner is None:
            owner = _Owner(self.layout.try_unpack(sid))
            if len(self._owners) < 65536:  # random DCIDs must not grow it without bound
                self._owners[sid] = owner
        return owner.node


def build_identity(section: QuicLBSection, keys: FleetKeys, worker: int = 0) -> ServerIdentity:
    """The identity of worker `worker` of the node `section` describes."""
    layout = ServerIdLayout(
        pop_bits=section.pop_bits,
        host_bits=section.host_bits,
        worker_bits=section.worker_bits,
        server_id_len=section.server_id_len,
    )
    params = LBParams(section.config_id, layout.server_id_len, section.nonce_len, section.encrypt)
    configs, _key_of, current = params.configs(keys)
    return ServerIdentity(
        codec=QuicLBCodec(configs.values(), current=current),
        layout=layout,
        node=(section.pop_index, section.host_index, worker),
        keys=keys,
        lb_params=params,
    )


def load_fleet_keys(config: Config) -> FleetKeys:
    """The fleet keys of `config`: `[fleet] key_file`, or the state directory's key file,
    generated on first use (a configured file must exist)."""
    configured = config.fleet.key_file
    if configured:
        return FleetKeys.load(config.path(configured))
    path: Path = config.path(config.pop.state_dir) / DEFAULT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return FleetKeys.generate(path, now=time.time())
        except FleetKeyError:
            if not path.exists():
                raise
            # another worker generated it first: load that one
    return FleetKeys.load(path)
