"""Inert HTML: the shipped summary page can be read, never run, and fetches nothing; verify refuses any other."""

from __future__ import annotations

import pytest

from pixcell_fed.bundle import verify_bundle
from pixcell_fed.bundle.html import INERT_CSP, INERT_CSP_META, check_inert_html
from pixcell_fed.errors import BundleError, VerificationError
from pixcell_fed.testing.bundles import build_run_bundle, consortium, inert_summary_html, real_tile_arrays, resign, write_run

GOOD = inert_summary_html()

#: (what, page, expected reason): every way a page could run code, fetch, redirect or hide text
SCRIPTED = [
    ("script", GOOD.replace("<h1>", "<script>fetch('/x?'+document.cookie)</script><h1>"), "<script>"),
    ("script, upper case", GOOD.replace("<h1>", "<SCRIPT SRC=x></SCRIPT><h1>"), "<script>"),
    ("onerror", GOOD.replace('alt="histogram"', 'alt="histogram" onerror="alert(1)"'), "event handler"),
    ("onload without quotes, slash separated", GOOD.replace("<h1>", "<svg/onload=alert(1)><h1>"), "event handler"),
    ("handler on an svg shape", GOOD.replace("<h1>", '<svg><rect width="9" height="9" onmouseover="x()"/></svg><h1>'),
     "event handler"),
    ("meta refresh", GOOD.replace("<title>", '<meta http-equiv="refresh" content="0;url=#x"><title>'), "refresh"),
    ("CSS @import of a remote URL", GOOD.replace("body {", "@import url('https://evil.example/x.css'); body {"),
     "@import"),
    ("CSS url() of a remote image", GOOD.replace("font-family: sans-serif",
                                                 "background: url(//evil.example/beacon.png)"), "url|external URL"),
    ("CSS escape spelling @import", GOOD.replace("body {", "@\\69mport 'x.css'; body {"), "escapes"),
    ("external img src", GOOD.replace("data:image/png;base64,iVBORw0KGgo=", "https://evil.example/beacon.png"),
     "external URL|only #anchors"),
    ("protocol-relative img src", GOOD.replace("data:image/png;base64,iVBORw0KGgo=", "//evil.example/b.png"),
     "only #anchors"),
    ("svg image in a data URI", GOOD.replace("data:image/png", "data:image/svg+xml"), "only #anchors"),
    ("javascript link", GOOD.replace('href="#top"', 'href="javascript:alert(1)"'), "javascript"),
    ("external link", GOOD.replace('href="#top"', 'href="https://evil.example/"'), "external URL|only #anchors"),
    ("iframe", GOOD.replace("<h1>", "<iframe srcdoc='x'></iframe><h1>"), "<iframe> is not an allowed element"),
    ("link stylesheet", GOOD.replace("<title>", "<link rel=stylesheet href=x.css><title>"), "<link>"),
    ("base", GOOD.replace("<title>", "<base href=x><title>"), "<base>"),
    ("form", GOOD.replace("<h1>", "<form action=x><h1>"), "<form>"),
    ("no policy", GOOD.replace(INERT_CSP_META, ""), "before the Content-Security-Policy meta"),
    ("policy missing entirely", "<html><body>x</body></html>", "before the Content-Security-Policy|no Content-Security"),
    ("weaker policy", GOOD.replace("default-src 'none'", "default-src *"), "must be exactly"),
    ("policy after content", GOOD.replace(INERT_CSP_META, "").replace("</head>", INERT_CSP_META + "</head>"),
     "before the Content-Security-Policy meta"),
    ("comment", GOOD.replace("<h1>", "<!-- MRN 99887766 --><h1>"), "comment"),
    ("URL in the text", GOOD.replace("0 of 5", "see http://pacs.hospital.local/case/1; 0 of 5"), "external URL"),
    ("file reference", GOOD.replace("0 of 5", "file:///srv/slides/CASE-1.svs 0 of 5"), "external URL"),
]


def test_the_inert_page_passes_and_carries_the_policy():
    check_inert_html(GOOD.encode())
    assert f'content="{INERT_CSP}"' in GOOD
    assert INERT_CSP == "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


@pytest.mark.parametrize("what, page, reason", SCRIPTED, ids=[s[0] for s in SCRIPTED])
def test_a_page_that_could_act_is_refused(what, page, reason):
    with pytest.raises(BundleError, match=reason):
        check_inert_html(page.encode(), name="audit_summary.html")


@pytest.fixture(scope="module")
def approved(tmp_path_factory):
    keys = consortium(("site-a",))
    run = write_run(tmp_path_factory.mktemp("site") / "work", "run-001", real_tile_arrays(3), summary_html=GOOD)
    return keys, build_run_bundle(run, keys, "site-a")


@pytest.mark.parametrize("what", ["script", "onerror", "meta refresh", "CSS @import of a remote URL",
                                  "external img src"])
def test_verify_refuses_a_bundle_whose_page_acts(approved, tmp_path, what):
    """A site holding its key swaps in a scripted page and re-signs (with a fooled officer): the coordinator refuses."""
    import shutil

    keys, original = approved
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    verify_bundle(bundle, keys.trust)
    page = dict((s[0], s[1]) for s in SCRIPTED)[what]
    resign(bundle, keys.site_keys["site-a"], keys.officer_keys["site-a"], html=page.encode())
    with pytest.raises(VerificationError, match="^audit_summary.html: ") as info:
        verify_bundle(bundle, keys.trust)
    assert "not inert" in info.value.hint
