"""Names come from keys: which connected Flower node is which consortium site.

A node's site is the trust-file site whose ``auth_key`` is the public key the node authenticated with
(``grid.get_nodes()`` -> ``NodeInfo.public_key``). Nothing a node says in a reply, and not the name it was
registered under, can make it another site. A node is ignored when its key is in no site's entry, when its
registered name is another site's, or when a second node presents a key that already named a site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pixcell_fed.bundle.trust import TrustStore


@dataclass(frozen=True)
class NodeIdentity:
    """What the SuperLink knows about a connected node: its id, the key it authenticated with, its registered name."""

    node_id: int
    public_key: bytes | str | None
    name: str = ""


@dataclass
class NodeMap:
    """Sites identified by key (site -> node id) and the nodes ignored, with the reason for each."""

    sites: dict[str, int] = field(default_factory=dict)
    ignored: dict[int, str] = field(default_factory=dict)


def key_fingerprint(public_key: bytes | str | None) -> str:
    """A short fingerprint of a node's key, for logs and the report (sha256 of the key's bytes, 16 hex)."""
    if not public_key:
        return "none"
    data = public_key.encode("ascii", "replace") if isinstance(public_key, str) else bytes(public_key)
    return hashlib.sha256(data.strip()).hexdigest()[:16]


def _describe(node: NodeIdentity) -> str:
    name = node.name if len(node.name) <= 64 else node.name[:64] + "..."
    return f"node {node.node_id} (registered as {name!r}, key {key_fingerprint(node.public_key)})"


def identify_nodes(nodes: Iterable[NodeIdentity], trust: TrustStore) -> NodeMap:
    """Map connected nodes to trust-file sites by their authentication key; see the module docstring."""
    found = NodeMap()
    for node in sorted(nodes, key=lambda n: n.node_id):
        site = trust.site_with_auth_key(node.public_key) if node.public_key else None
        if site is None:
            reason = "its key is not the auth_key of any site in the trust file"
        elif node.name and node.name != site:
            reason = f"it is registered as {node.name!r} but holds the key of site {site!r}"
        elif site in found.sites:
            reason = f"site {site!r} is already connected as node {found.sites[site]}"
        else:
            found.sites[site] = node.node_id
            continue
        found.ignored[node.node_id] = f"{_describe(node)} ignored: {reason}"
    return found
