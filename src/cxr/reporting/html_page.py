"""The report's HTML shell: a self-contained page (figures inlined as data URIs, one style sheet,
click-to-zoom), shared by the study's page and the multi-seed page."""

from __future__ import annotations

import base64
import html
from pathlib import Path


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _html_table(head: list[str], body: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


ZOOM = ("<script>document.addEventListener('click', e => { if (e.target.tagName === 'IMG') "
        "e.target.classList.toggle('big'); }); document.addEventListener('keydown', e => { if (e.key === 'Escape') "
        "document.querySelectorAll('img.big').forEach(i => i.classList.remove('big')); });</script>")


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;display:block;max-width:100%;overflow-x:auto}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}figure{display:inline-block;margin:0.5em;vertical-align:top}
img{max-width:100%;border:1px solid #eee;cursor:zoom-in}figcaption{font-size:0.9em;color:#555}
img.big{position:fixed;inset:0;margin:auto;max-width:98vw;max-height:98vh;z-index:10;cursor:zoom-out;
background:#fff;box-shadow:0 0 0 100vmax rgba(0,0,0,0.6)}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto}.task{border-top:2px solid #ddd;margin-top:2em}"""
