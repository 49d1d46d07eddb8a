"""The shareable summary page must be inert: it can be read, never run, and it fetches nothing.

``audit_summary.html`` travels to the coordinator and is opened in browsers there, so it is checked with a real
HTML parser (:mod:`html.parser`) and, against parser differences, with a raw scan of its text:

- elements from an allow-list only (text, headings, tables, lists, figures, ``<img>``, ``<style>``, plain inline
  SVG); no ``<script>``, ``<iframe>``, ``<object>``, ``<link>``, ``<base>``, ``<form>``...;
- no event handler attribute (``on*``), no ``javascript:``, no comment, processing instruction or CDATA;
- no external URL anywhere: links are ``#anchors``, images are ``data:image/(png|jpeg|gif|webp)`` URIs, CSS
  ``url(...)`` points at the same, no CSS ``@import``, no CSS escapes that could spell them;
- no ``<meta http-equiv="refresh">`` or any ``http-equiv`` other than the policy below;
- a Content-Security-Policy meta, first in ``<head>``, of exactly :data:`~pixcell_fed.html_policy.INERT_CSP`
  (nothing may load, inline styles and ``data:`` images may show), so that a browser enforces all of this too.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from pixcell_fed.errors import BundleError
from pixcell_fed.html_policy import INERT_CSP, INERT_CSP_META

MAX_SUMMARY_HTML_BYTES = 50 * 1024 * 1024

_HTML_TAGS = {
    "html",
    "head",
    "body",
    "title",
    "meta",
    "style",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "p",
    "div",
    "span",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "figure",
    "figcaption",
    "img",
    "table",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "tr",
    "th",
    "td",
    "colgroup",
    "col",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "strong",
    "em",
    "b",
    "i",
    "u",
    "small",
    "sub",
    "sup",
    "code",
    "pre",
    "br",
    "hr",
    "blockquote",
    "abbr",
    "details",
    "summary",
    "a",
}
_SVG_TAGS = {
    "svg",
    "g",
    "path",
    "rect",
    "circle",
    "ellipse",
    "line",
    "polyline",
    "polygon",
    "text",
    "tspan",
    "desc",
    "defs",
    "lineargradient",
    "radialgradient",
    "stop",
    "clippath",
}
ALLOWED_TAGS = frozenset(_HTML_TAGS | _SVG_TAGS)
#: elements allowed before the policy meta (the policy covers only what follows it)
_BEFORE_POLICY = {"html", "head", "meta", "title"}
#: attributes whose value the browser fetches or navigates to
_URL_ATTRS = {
    "href",
    "xlink:href",
    "src",
    "srcset",
    "action",
    "formaction",
    "poster",
    "data",
    "background",
    "cite",
    "longdesc",
    "ping",
    "codebase",
    "manifest",
    "icon",
    "profile",
    "lowsrc",
    "dynsrc",
    "usemap",
    "archive",
    "classid",
}
_NAMESPACES = {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink", "http://www.w3.org/1999/xhtml"}
_DATA_IMAGE_RE = re.compile(r"^data:image/(?:png|jpeg|gif|webp)(?:;base64)?,[A-Za-z0-9+/=%\s]*$", re.IGNORECASE)
_CSS_URL_RE = re.compile(r"url\(\s*(['\"]?)(.*?)\1\s*\)", re.IGNORECASE | re.DOTALL)
_CSS_FORBIDDEN = re.compile(
    r"@import|expression\s*\(|(?<![\w-])behavior\s*:|-moz-binding|image-set\s*\(|(?<![\w-])image\s*\("
    r"|(?<![\w-])src\s*\(",
    re.IGNORECASE,
)
_DATA_PAYLOAD_RE = re.compile(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=\s]*", re.IGNORECASE)
_RAW_TAG_RE = re.compile(r"<[^>]*>", re.DOTALL)
_RAW_HANDLER_RE = re.compile(r"(?:^|[\s/\"'])on[a-z]+\s*=", re.IGNORECASE)
_RAW_FORBIDDEN = (
    ("<script", "a <script> element"),
    ("javascript:", "a javascript: URL"),
    ("vbscript:", "a vbscript: URL"),
    ("@import", "a CSS @import"),
)
_URL_SCHEME_RE = re.compile(r"[a-z][a-z0-9+.\-]*://|\bfile:", re.IGNORECASE)
_HINT = "the shareable summary must be inert: no script, no event handler, no external URL (see docs/bundle-format.md)"


def _policy(content: str) -> set[str]:
    return {" ".join(part.split()).lower() for part in content.split(";") if part.strip()}


_INERT_POLICY = _policy(INERT_CSP)


def check_css(css: str, where: str) -> None:
    """Refuse CSS that could fetch anything: ``@import``, non-``data:`` ``url()``, escapes, legacy script hooks."""
    if "\\" in css:
        raise _bad(f"{where}: CSS escapes (backslashes) are not allowed")
    text = css
    while "/*" in text:
        start = text.index("/*")
        end = text.find("*/", start + 2)
        if end < 0:
            raise _bad(f"{where}: unterminated CSS comment")
        text = text[:start] + " " + text[end + 2 :]
    low = text.lower()
    forbidden = _CSS_FORBIDDEN.search(text)
    if forbidden:
        raise _bad(f"{where}: CSS {forbidden.group(0)!r} is not allowed (it can fetch or run code)")
    for match in _CSS_URL_RE.finditer(text):
        target = match.group(2).strip()
        if not (target.startswith("#") or _DATA_IMAGE_RE.match(target)):
            raise _bad(f"{where}: CSS url({target[:80]!r}) points outside the page")
    if low.count("url(") != len(_CSS_URL_RE.findall(text)):
        raise _bad(f"{where}: malformed CSS url(...)")


def _bad(message: str) -> BundleError:
    return BundleError(message, hint=_HINT)


class _InertChecker(HTMLParser):
    def __init__(self, name: str) -> None:
        super().__init__(convert_charrefs=True)
        self.name = name
        self.policy_seen = False
        self.stack: list[str] = []

    def _where(self, what: str) -> str:
        line, col = self.getpos()
        return f"{self.name}: line {line}, column {col + 1}: {what}"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            raise _bad(self._where("a <script> element; the summary may not run code"))
        if tag not in ALLOWED_TAGS:
            raise _bad(self._where(f"<{tag}> is not an allowed element"))
        if not self.policy_seen and tag not in _BEFORE_POLICY:
            raise _bad(self._where(f"<{tag}> before the Content-Security-Policy meta, which must come first in <head>"))
        for name, value in attrs:
            self._check_attribute(tag, name, value or "")
        if tag == "meta":
            self._check_meta(dict(attrs))
        if tag == "style":
            self.stack.append(tag)

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag: str) -> None:
        if self.stack and self.stack[-1] == tag:
            self.stack.pop()

    def _check_attribute(self, tag: str, name: str, value: str) -> None:
        if name.startswith("on"):
            raise _bad(self._where(f"event handler attribute {name}= on <{tag}>"))
        low = value.strip().lower()
        if name in ("xmlns", "xmlns:xlink"):
            if value.strip() not in _NAMESPACES:
                raise _bad(self._where(f"unknown namespace {value[:80]!r}"))
            return
        if name in _URL_ATTRS:
            if name in ("href", "xlink:href") and low.startswith("#"):
                return
            if name == "src" and tag == "img" and _DATA_IMAGE_RE.match(value.strip()):
                return
            raise _bad(
                self._where(f"{name}={value[:80]!r} on <{tag}>: only #anchors and data:image/(png|jpeg|gif|webp) URIs")
            )
        if name == "style" or "url(" in low:
            check_css(value, self._where(f"{name}= on <{tag}>"))
        if _URL_SCHEME_RE.search(value) or "javascript:" in low or "vbscript:" in low:
            raise _bad(self._where(f"{name}={value[:80]!r} on <{tag}> holds a URL"))

    def _check_meta(self, attrs: dict[str, str | None]) -> None:
        equiv = (attrs.get("http-equiv") or "").strip().lower()
        if not equiv:
            return
        if equiv == "refresh":
            raise _bad(self._where('<meta http-equiv="refresh">: the summary may not redirect or reload'))
        if equiv != "content-security-policy":
            raise _bad(self._where(f"<meta http-equiv={equiv!r}> is not allowed"))
        if self.policy_seen:
            raise _bad(self._where("a second Content-Security-Policy meta"))
        if _policy(attrs.get("content") or "") != _INERT_POLICY:
            raise _bad(self._where(f"the Content-Security-Policy must be exactly {INERT_CSP!r}"))
        self.policy_seen = True

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "style":
            check_css(data, self._where("<style>"))

    def handle_comment(self, data: str) -> None:
        raise _bad(self._where("an HTML comment; comments hide text from the reader"))

    def handle_decl(self, decl: str) -> None:
        if decl.strip().lower() != "doctype html":
            raise _bad(self._where(f"declaration <!{decl[:40]}>; only <!DOCTYPE html> is allowed"))

    def handle_pi(self, data: str) -> None:
        raise _bad(self._where("a processing instruction"))

    def unknown_decl(self, data: str) -> None:
        raise _bad(self._where("a CDATA section or unknown declaration"))


def check_inert_html(data: bytes, *, name: str = "audit_summary.html") -> None:
    """Refuse a summary page that is not inert UTF-8 HTML (see the module docstring), naming what is wrong."""
    if len(data) > MAX_SUMMARY_HTML_BYTES:
        raise BundleError(
            f"{name}: {len(data)} bytes, more than {MAX_SUMMARY_HTML_BYTES}", hint="share a smaller summary"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BundleError(f"{name}: not UTF-8 text", hint="pass the audit's shareable summary HTML") from exc
    if "\x00" in text:
        raise _bad(f"{name}: contains NUL characters")
    # a raw scan first, so that a construct html.parser reads differently from a browser is still caught
    raw = _DATA_PAYLOAD_RE.sub("data:", text)  # base64 payloads hold '/', letters and '=' by chance
    low = raw.lower()
    for needle, what in _RAW_FORBIDDEN:
        if needle in low:
            raise _bad(f"{name}: contains {what}")
    for tag in _RAW_TAG_RE.findall(raw):
        if _RAW_HANDLER_RE.search(tag[1:]):
            raise _bad(f"{name}: an event handler attribute in {tag[:80]!r}")
    for ns in _NAMESPACES:
        raw = raw.replace(ns, "")
    match = _URL_SCHEME_RE.search(raw)
    if match:
        context = raw[max(0, match.start() - 30) : match.end() + 50].strip()
        raise _bad(f"{name}: an external URL or file reference near {context[:100]!r}")
    checker = _InertChecker(name)
    checker.feed(text)
    checker.close()
    if not checker.policy_seen:
        raise _bad(f"{name}: no Content-Security-Policy meta; add {INERT_CSP_META} first in <head>")
