"""An mkdocs hook: the site's TeX becomes MathML at build time, so no page needs a script or the network.

pymdownx.arithmatex (generic mode) leaves each formula of the Markdown and of the docstrings as
``<span class="arithmatex">\\(...\\)</span>`` (inline) or ``<div class="arithmatex">\\[...\\]</div>``
(display). This hook converts each into a ``<math>`` element with latex2mathml, display="block"
for display math, keeping the wrapper (the theme styles ``.arithmatex``). Formulas in headings are
converted in the table of contents too. Browsers lay out MathML themselves.

TeX that latex2mathml cannot convert, converts leaving a ``\\command`` it does not know, or
converts with sizes browsers ignore (``\\xrightarrow``) is a warning: ``mkdocs build --strict``
fails on it.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

from latex2mathml.converter import convert

log = logging.getLogger("mkdocs.hooks.mathml")

ARITHMATEX = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?P<open>\\\(|\\\[)(?P<tex>.*?)(?:\\\)|\\\])\s*</(?P=tag)>',
    re.DOTALL,
)
TOC_MATH = re.compile(r"\\\((?P<tex>.*?)\\\)", re.DOTALL)
TAG = re.compile(r"<[^>]+>")
RELATIVE_SIZE = re.compile(r'\s(?:width|height|depth|lspace|voffset)="[+-]')


def to_mathml(tex: str, display: str, where: str) -> str | None:
    """The MathML of ``tex`` (plain TeX, not HTML-escaped), or None after a warning."""
    try:
        mathml = convert(tex.strip(), display=display)
    except Exception as error:  # latex2mathml raises its own errors (and IndexError...) on bad TeX
        log.warning("%s: latex2mathml cannot convert %r: %s: %s", where, tex, type(error).__name__, error)
        return None
    if "\\" in html.unescape(TAG.sub("", mathml)):
        log.warning("%s: latex2mathml does not know a command in %r: %s", where, tex, mathml)
        return None
    if RELATIVE_SIZE.search(mathml):  # \xrightarrow's label lands on the arrow: write \overset{label}{\rightarrow}
        log.warning("%s: %r gives relative sizes (\"+1em\") that MathML Core ignores: %s", where, tex, mathml)
        return None
    return mathml


def render(page_html: str, where: str) -> str:
    """``page_html`` with every arithmatex span and div made MathML."""

    def replace(match: re.Match[str]) -> str:
        display = "block" if match["open"] == "\\[" else "inline"
        mathml = to_mathml(html.unescape(match["tex"]), display, where)
        if mathml is None:
            return match[0]
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    return ARITHMATEX.sub(replace, page_html)


def on_page_content(html_: str, page: Any, **kwargs: Any) -> str:
    where = page.file.src_uri
    stack = list(page.toc.items)
    while stack:  # a heading's title in the table of contents is text, its TeX still delimited
        item = stack.pop()
        item.title = TOC_MATH.sub(lambda m: to_mathml(html.unescape(m["tex"]), "inline", where) or m[0], item.title)
        stack.extend(item.children)
    return render(html_, where)
