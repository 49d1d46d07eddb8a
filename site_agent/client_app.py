"""The site's Flower ClientApp: thin wiring to :mod:`pixcell_fed.federation.site_server`.

Every message starts a fresh process: the handlers read the prepared, approved bundle and the held-out folder
named in the SuperNode's node config (``site-agent serve`` sets it) and answer; nothing else is served.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


def _settings(context: Context):
    from pixcell_fed.federation.site_server import SiteSettings

    return SiteSettings.from_node_config(context.node_config)


@app.query("manifest")
def manifest(msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import handle_manifest

    return Message(handle_manifest(msg.content, _settings(context)), reply_to=msg)


@app.query("chunk")
def chunk(msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import handle_chunk

    return Message(handle_chunk(msg.content, _settings(context)), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import handle_evaluate

    return Message(handle_evaluate(msg.content, _settings(context)), reply_to=msg)


@app.evaluate("augmentation")
def augmentation(msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import handle_augmentation

    return Message(handle_augmentation(msg.content, _settings(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pixcell_fed.federation.site_server import handle_train

    return Message(handle_train(msg.content, _settings(context), context.state), reply_to=msg)
