"""Where a table's rows live in Redis: the store URI, parsed into a typed config, and the
consistent-hash ring that maps fids onto independent servers.

URI: ``redis://[:password@]host:port[,host:port...][/db][?prefix=P&cache_rows=N&ttl=on|off
&ttl_grace_ms=MS&write_behind=on|off&retry_for=S&timeout=S]``; ``redis+cluster://host:port[,...]`` for a Redis Cluster (its seed nodes).

Sharding (several independent servers): fids map to servers by consistent hashing - a ring of
``VNODES`` points per server, a fid served by the first point at or after ``mix64(fid)`` - so
adding a server moves about 1/(n+1) of the rows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote

import numpy as np
import torch

from trainer.hashing import mix64

VNODES = 160  # ring points per server


@dataclass(frozen=True)
class RedisStoreConfig:
    servers: tuple[tuple[str, int], ...]
    cluster: bool = False
    db: int = 0
    password: str | None = None
    prefix: str = "streamrec"
    cache_rows: int = 1_000_000  # rows each table keeps in its (device) cache in front of the store
    ttl: bool = False  # wall-clock TTLs as garbage collection (see the module docstring)
    ttl_grace_ms: int | None = None  # None: one more expire_after of the slot
    retry_for_s: float = 10.0
    timeout_s: float = 5.0
    write_behind: bool = True  # writes go out while the trainer computes; reads wait for them

    @classmethod
    def from_uri(cls, uri: str) -> "RedisStoreConfig":
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in ("redis", "redis+cluster"):
            raise ValueError(f"store: expected redis://host:port[,host:port...] or redis+cluster://..., got {uri!r}")
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        password = None
        if "@" in netloc:
            auth, netloc = netloc.rsplit("@", 1)
            password = unquote(auth.split(":", 1)[-1]) or None
        servers = []
        for server in filter(None, netloc.split(",")):
            host, colon, port = server.rpartition(":")
            if not colon or not port.isdigit():
                raise ValueError(f"store: server {server!r} in {uri!r} must be host:port")
            servers.append((host, int(port)))
        if not servers:
            raise ValueError(f"store: no server in {uri!r}")
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        known = {"prefix", "cache_rows", "ttl", "ttl_grace_ms", "retry_for", "timeout", "write_behind"}
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"store: unknown parameter(s) {sorted(unknown)} in {uri!r}; known: {sorted(known)}")
        if path and not path.isdigit():
            raise ValueError(f"store: database must be a number, got {path!r} in {uri!r}")
        for switch in ("ttl", "write_behind"):
            if params.get(switch, "on") not in ("on", "off"):  # (validated; defaults below)
                raise ValueError(f"store: {switch} must be on or off, got {params[switch]!r}")
        try:
            return cls(servers=tuple(servers), cluster=scheme == "redis+cluster", db=int(path or 0),
                       password=password, prefix=params.get("prefix", "streamrec"),
                       cache_rows=int(params.get("cache_rows", 1_000_000)), ttl=params.get("ttl", "off") == "on",
                       ttl_grace_ms=int(params["ttl_grace_ms"]) if "ttl_grace_ms" in params else None,
                       retry_for_s=float(params.get("retry_for", 10.0)), timeout_s=float(params.get("timeout", 5.0)),
                       write_behind=params.get("write_behind", "on") == "on")
        except ValueError as exc:
            raise ValueError(f"store: bad parameter in {uri!r}: {exc}") from None


class HashRing:
    """Consistent hashing of fids onto servers (``VNODES`` points per server)."""

    def __init__(self, names: list[str], vnodes: int = VNODES):
        points, owners = [], []
        for owner, name in enumerate(names):
            for v in range(vnodes):
                digest = hashlib.blake2b(f"{name}#{v}".encode(), digest_size=8).digest()
                points.append(int.from_bytes(digest, "little", signed=True))
                owners.append(owner)
        order = np.argsort(points, kind="stable")
        self.points = np.asarray(points, dtype=np.int64)[order]
        self.owners = np.asarray(owners, dtype=np.int64)[order]

    def shard_of(self, fids: torch.Tensor) -> np.ndarray:
        hashes = mix64(fids.cpu()).numpy()
        at = np.searchsorted(self.points, hashes, side="left") % len(self.points)
        return self.owners[at]
