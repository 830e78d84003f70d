"""What a browser shows of a HyperText task's HTML: the text an annotator reads, which the backend encodes."""

from __future__ import annotations

import re

import lxml.etree
import lxml.html

HIDDEN_TAGS = frozenset({"script", "style", "template", "title", "noscript"})
"""Elements whose text a page does not show (a <title> goes to the browser's tab, not into the page; <noscript>
shows only where scripts are off, and Label Studio's editor needs them on)."""

IMPORTANT = re.compile(r"!\s*important\s*$", re.IGNORECASE)


def _inline_display(style: str) -> str | None:
    """The `display` an inline style gives its element, lower-cased, or None: the last declaration, unless an
    earlier one is `!important` and it is not."""
    display, important = None, False
    for declaration in style.split(";"):
        name, colon, value = declaration.partition(":")
        if colon and name.strip().lower() == "display":
            flagged = bool(IMPORTANT.search(value))
            if flagged or not important:
                display, important = IMPORTANT.sub("", value).strip().lower(), flagged
    return display


def _hidden(node) -> bool:
    """Whether a page hides an element and all it holds: a tag never shown, an inline `display: none`, or the
    `hidden` attribute (which an inline `display` overrides); stylesheets are not read. Never <html> or <body>:
    `<HyperText inline="true">` drops their attributes."""
    if node.tag in HIDDEN_TAGS:
        return True
    if node.tag in ("html", "body"):
        return False
    display = _inline_display(node.get("style") or "")
    return display == "none" or (display is None and node.get("hidden") is not None)


BLOCK_TAGS = frozenset(
    "address article aside blockquote br button caption center dd details dialog div dl dt fieldset figcaption "
    "figure footer form h1 h2 h3 h4 h5 h6 header hr iframe img input legend li main menu nav ol option p pre "
    "section select summary table tbody td textarea tfoot th thead tr ul".split()
)
"""Elements a browser sets apart from the text around them (a line break, a cell, a control, an image): their text
is a word of its own. Inline elements (<b>, <a>, <span>...) are not: `un<b>believ</b>able` reads `unbelievable`."""

HYPERTEXT_READING = 3
"""Bumped whenever `visible_text` reads a page differently, so that task lists read before (their texts keyed the
old way, see TaskSnapshot.text_source) are read again. 2: text in document order, inline tags joined. 3: <noscript>,
`hidden` and `display: none` elements left out."""


def visible_text(html: str) -> str:
    """What a browser shows of an HTML fragment, in the order it shows it: its text outside <script>, <style>,
    <template>, <title>, <noscript>, hidden elements (`_hidden`) and comments, entities decoded, whitespace
    collapsed, block elements apart and inline ones not: `<p>Fish &amp; <b>chips</b></p>Peas` -> `Fish & chips
    Peas`.

    libxml2's HTML parser (through lxml) takes any markup, broken or hostile, in linear time; Python's
    `html.parser` fails on some (`<![ ]]>`) and is quadratic on others (100 KB of `<!--`: 9 s). `huge_tree` raises
    libxml2's limits, past which it drops the rest of the page, from 256 levels of nesting to 2,048 and lifts the
    10 MB limit on a text node.
    """
    parser = lxml.html.HTMLParser(encoding="utf-8", huge_tree=True)
    try:
        document = lxml.html.document_fromstring(html.encode("utf-8"), parser=parser)
    except lxml.etree.ParserError:  # nothing but markup, or nothing at all
        return ""
    parts: list[str] = []
    hiding: list[bool] = []  # per element the walk is inside, whether it hides what it holds
    hidden = 0  # how many of them do
    for event, node in lxml.etree.iterwalk(document, events=("start", "end", "comment", "pi")):
        if event == "start":
            hiding.append(_hidden(node))
            hidden += hiding[-1]
            if not hidden:
                parts += [" " if node.tag in BLOCK_TAGS else "", node.text or ""]
        elif event == "end" and hiding.pop():
            hidden -= 1
        elif event == "end" and not hidden:
            parts.append(" " if node.tag in BLOCK_TAGS else "")
        # the text after an element (its tail) is its parent's: shown when the parent is; after its own content
        if event != "start" and not hidden and node is not document:
            parts.append(node.tail or "")
    return " ".join("".join(parts).split())
