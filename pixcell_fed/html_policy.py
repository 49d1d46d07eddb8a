"""The policy every shareable HTML page carries: a Content-Security-Policy under which nothing loads or runs.

The audit writes its shareable summary page with :data:`INERT_CSP_META` first in ``<head>``; the bundle layer
(:mod:`pixcell_fed.bundle.html`) refuses any page whose policy is not exactly :data:`INERT_CSP`. Both import it
from here, so that the audit never imports the bundle layer it feeds.
"""

from __future__ import annotations

#: nothing may load, inline styles and ``data:`` images may show (no script: ``default-src 'none'`` covers it)
INERT_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
INERT_CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{INERT_CSP}">'
