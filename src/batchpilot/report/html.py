"""A small document model and its rendering as one self-contained HTML file.

Plots are embedded as base64 PNGs, styles are inline, nothing is fetched from the network. The page
carries a tiny script that records, once loaded, how many images it has, how many failed to decode
and how many errors were raised, as attributes of ``<html>`` — so a headless browser can check the
page (see ``tests/test_report_browser.py``).

>>> html = render_html(Document("t", [Section("s", paragraphs=["a < b"])]))
>>> "a &lt; b" in html and html.startswith("<!DOCTYPE html>")
True
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from matplotlib.figure import Figure as MplFigure


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Sequence[Sequence[object]]
    caption: str | None = None


@dataclass(frozen=True)
class Figure:
    png: bytes
    caption: str

    @classmethod
    def from_matplotlib(cls, figure: MplFigure, caption: str) -> Figure:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return cls(buffer.getvalue(), caption)


@dataclass(frozen=True)
class Section:
    title: str
    paragraphs: Sequence[str] = ()
    tables: Sequence[Table] = ()
    figures: Sequence[Figure] = ()
    bullets: Sequence[str] = ()
    css_class: str = ""
    anchor: str = ""


@dataclass(frozen=True)
class Document:
    title: str
    sections: Sequence[Section]
    subtitle: str = ""
    generated: str = field(
        default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    )


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{margin-bottom:.1em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.sub{color:#666;margin-top:0}table{border-collapse:collapse;margin:.6em 0 1em}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f5f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
caption{caption-side:top;text-align:left;color:#555;padding:.2em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
.warning{background:#fff7e6;border-left:4px solid #f0a020;padding:.2em 1em}
.headline{background:#eef6ff;border-left:4px solid #2a7ae2;padding:.2em 1em}
nav a{margin-right:.8em}code{background:#f5f5f7;padding:0 .2em}
"""

# Records load problems for headless checks; harmless for a person reading the page.
_CHECK_SCRIPT = """
(function(){var errors=[];
window.addEventListener('error',function(e){var t=e.target;
errors.push(t&&t.tagName?('cannot load '+t.tagName.toLowerCase()):String(e.message));},true);
window.addEventListener('load',function(){var imgs=document.images,broken=0;
for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0){broken++;}}
var root=document.documentElement;root.setAttribute('data-images',String(imgs.length));
root.setAttribute('data-broken-images',String(broken));root.setAttribute('data-errors',String(errors.length));
root.setAttribute('data-error-list',errors.join(' | '));root.setAttribute('data-loaded','yes');});})();
"""


def _cell(value: object) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
        return f'<td class="num">{html.escape(text)}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in table.rows)
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    caption = html.escape(figure.caption)
    return (
        f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _section(section: Section) -> str:
    parts = [f"<h2>{html.escape(section.title)}</h2>"]
    parts += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
    if section.bullets:
        parts.append(
            "<ul>" + "".join(f"<li>{html.escape(b)}</li>" for b in section.bullets) + "</ul>"
        )
    parts += [_table(t) for t in section.tables]
    parts += [_figure(f) for f in section.figures]
    anchor = f' id="{html.escape(section.anchor)}"' if section.anchor else ""
    css = f' class="{html.escape(section.css_class)}"' if section.css_class else ""
    return f"<section{anchor}{css}>{''.join(parts)}</section>"


def render_html(document: Document) -> str:
    """The whole document as one HTML string."""
    nav = "".join(
        f'<a href="#{html.escape(s.anchor)}">{html.escape(s.title)}</a>'
        for s in document.sections
        if s.anchor
    )
    subtitle = f'<p class="sub">{html.escape(document.subtitle)}</p>' if document.subtitle else ""
    body = "".join(_section(s) for s in document.sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(document.title)}</title><style>{_STYLE}</style>"
        f"<script>{_CHECK_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(document.title)}</h1>{subtitle}"
        f'<p class="sub">generated {html.escape(document.generated)} by batchpilot</p>'
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )
