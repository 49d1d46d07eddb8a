"""The site's ClientApp: the installed ``site_agent.client_app``."""

from site_agent import client_app

app = client_app.app
