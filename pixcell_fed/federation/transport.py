"""How the coordinator talks to the sites: a :class:`Transport` over a live Flower ``Grid``, or an in-memory fake.

A transport lists the connected nodes with the key each authenticated with (``nodes()``), queues messages
(``push``) and collects whichever replies have arrived (``pull``), so that the coordinator polls at its own
short interval and handles each reply as it comes instead of waiting for the slowest site.
:meth:`PolledExchange.exchange` is the one "send these, wait for all" helper built on the two.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pixcell_fed.federation import protocol as P
from pixcell_fed.federation.node_identity import NodeIdentity

if TYPE_CHECKING:
    from flwr.app import RecordDict

MAX_ERROR_TEXT = 300


@dataclass(frozen=True)
class Request:
    """One message to one node."""

    node: int
    kind: str
    content: RecordDict


@dataclass(frozen=True)
class Reply:
    """A node's answer: ``content``; or ``error`` when it failed or vanished, with the site's generic ``code``
    when the site itself refused."""

    content: RecordDict | None = None
    error: str | None = None
    code: str | None = None


def reply_of_content(content: RecordDict) -> Reply:
    """A site's reply content as a :class:`Reply` (a refusal becomes its generic code, nothing else)."""
    code = P.error_code(content)
    if code is not None:
        return Reply(error=f"the site refused ({code})", code=code)
    return Reply(content=content)


def _printable(text: str) -> str:
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    return clean[:MAX_ERROR_TEXT]


class Transport(Protocol):
    """What the coordinator needs from Flower."""

    def nodes(self) -> list[NodeIdentity]: ...

    def push(self, requests: Sequence[Request]) -> list[str | None]: ...

    def pull(self, message_ids: Collection[str]) -> dict[str, Reply]: ...

    def exchange(self, requests: Mapping[int, tuple[str, RecordDict]], *, timeout: float) -> dict[int, Reply]: ...


class PolledExchange:
    """``exchange`` for any transport with ``push``/``pull``: send to several nodes and wait for every reply."""

    poll_interval_s: float = 0.1

    def push(self, requests: Sequence[Request]) -> list[str | None]:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    def pull(self, message_ids: Collection[str]) -> dict[str, Reply]:  # pragma: no cover
        raise NotImplementedError

    def exchange(self, requests: Mapping[int, tuple[str, RecordDict]], *, timeout: float) -> dict[int, Reply]:
        """Send one message to each node at once; returns node -> reply (an error reply for a silent node)."""
        nodes = list(requests)
        ids = self.push([Request(node, kind, content) for node, (kind, content) in requests.items()])
        out = {node: Reply(error="the message could not be sent") for node, mid in zip(nodes, ids) if mid is None}
        waiting = {mid: node for node, mid in zip(nodes, ids) if mid is not None}
        deadline = time.monotonic() + timeout
        while waiting and time.monotonic() < deadline:
            arrived = self.pull(list(waiting))
            for mid, reply in arrived.items():
                out[waiting.pop(mid)] = reply
            if waiting and not arrived:
                time.sleep(self.poll_interval_s)
        for node in waiting.values():
            out[node] = Reply(error=f"no reply within {timeout:.0f} s")
        return out


class GridTransport(PolledExchange):
    """:class:`Transport` over a live Flower ``Grid`` (inside the ServerApp), polled every ``poll_interval_s``."""

    def __init__(self, grid: Any, *, poll_interval_s: float = 0.1) -> None:
        self.grid = grid
        self.poll_interval_s = poll_interval_s

    def nodes(self) -> list[NodeIdentity]:
        return [
            NodeIdentity(node_id=int(n.node_id), public_key=bytes(n.public_key or b""), name=str(n.name or ""))
            for n in self.grid.get_nodes()
        ]

    def push(self, requests: Sequence[Request]) -> list[str | None]:
        from flwr.app import Message

        if not requests:
            return []
        messages = [Message(r.content, dst_node_id=int(r.node), message_type=r.kind) for r in requests]
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):  # e.g. a payload the link refused: nothing was queued reliably
            return [None] * len(messages)
        return [str(i) if i else None for i in ids]

    def pull(self, message_ids: Collection[str]) -> dict[str, Reply]:
        wanted = set(message_ids)
        out: dict[str, Reply] = {}
        if not wanted:
            return out
        for msg in self.grid.pull_messages(list(wanted)):
            # match by the id of the message answered: an error about a dead node comes from the link, not the node
            mid = msg.metadata.reply_to_message_id
            if mid not in wanted:
                continue
            if msg.has_error():
                out[mid] = Reply(error=_printable(f"{msg.error.reason} (code {msg.error.code})"))
            else:
                out[mid] = reply_of_content(msg.content)
        return out
