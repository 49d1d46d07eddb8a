"""The site's Flower ClientApp: thin wiring to :func:`pixcell_fed.federation.site_server.answer_node`.

Every message starts a fresh process: the handlers read the approved bundle, the held-out folder and the site's
own site.yaml named in the SuperNode's node config (``site-agent serve`` sets it) and answer, or refuse with a
generic code; nothing else is served.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pixcell_fed.federation import protocol as P

app = ClientApp()


def _answer(kind: str, msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import answer_node

    content = answer_node(kind, msg.content, context.node_config, flower_run=msg.metadata.run_id, state=context.state)
    return Message(content, reply_to=msg)


@app.query("manifest")
def manifest(msg: Message, context: Context) -> Message:
    return _answer(P.MSG_MANIFEST, msg, context)


@app.query("chunk")
def chunk(msg: Message, context: Context) -> Message:
    return _answer(P.MSG_CHUNK, msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _answer(P.MSG_EVALUATE, msg, context)


@app.evaluate("augmentation")
def augmentation(msg: Message, context: Context) -> Message:
    return _answer(P.MSG_AUGMENTATION, msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _answer(P.MSG_TRAIN, msg, context)
