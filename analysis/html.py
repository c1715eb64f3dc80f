"""report.html: the report's Markdown as one self-contained HTML page (figures embedded as base64 PNG).

MLflow's artifact viewer shows an .html artifact as a page but a Markdown file as text, and it cannot
follow a relative image link: the page embeds every PNG the Markdown shows, so it reads the same in
the MLflow UI, a browser, or as a mailed file. Only what analysis.report writes is rendered (headings,
paragraphs, pipe tables, lists, block quotes, images, links, inline code, bold and italics); no
dependency beyond the standard library.
"""
from __future__ import annotations

import base64
import html
import os
import re

__all__ = ["markdown_to_html"]

_STYLE = """body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3}td{text-align:right}td:first-child{text-align:left}figure{margin:1.5em 0}
img{max-width:100%}figcaption{font-size:13px;color:#555}blockquote{border-left:4px solid #d33;margin:1em 0;
padding:.2em 1em;background:#fff6f6}code{background:#f5f5f5;padding:0 3px}"""


def _inline(text: str, base: str) -> str:
    """Escape, then inline code, images, links, bold and italics."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for p in parts:
        if p.startswith("`") and p.endswith("`") and len(p) >= 2:
            out.append(f"<code>{html.escape(p[1:-1])}</code>")
            continue
        s = html.escape(p, quote=False)
        s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", lambda m: _img(m.group(1), m.group(2), base), s)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        s = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", s)
        out.append(s)
    return "".join(out)


def _img(alt: str, src: str, base: str) -> str:
    path = os.path.join(base, html.unescape(src))
    if src.lower().endswith(".png") and os.path.isfile(path):
        with open(path, "rb") as fh:
            src = "data:image/png;base64," + base64.b64encode(fh.read()).decode("ascii")
    return f'<img src="{src}" alt="{alt.replace(chr(34), "&quot;")}">'  # alt: escaped with the text


def _cells(line: str) -> list[str]:
    line = line.strip()
    line = line[1:] if line.startswith("|") else line
    line = line[:-1] if line.endswith("|") and not line.endswith("\\|") else line
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def markdown_to_html(md: str, base: str, title: str = "report") -> str:
    """The page for `md`, images read from `base` (the folder the Markdown's relative paths start at)."""
    body: list[str] = []
    blocks = re.split(r"\n\s*\n", md.strip("\n"))
    for block in blocks:
        lines = block.splitlines()
        first = lines[0]
        if block.startswith("```"):
            code = lines[1:-1] if lines[-1].startswith("```") else lines[1:]
            body.append(f"<pre><code>{html.escape(chr(10).join(code))}</code></pre>")
        elif m := re.match(r"^(#{1,6}) (.*)$", first):
            n = len(m.group(1))
            body.append(f"<h{n}>{_inline(m.group(2), base)}</h{n}>")
            if len(lines) > 1:
                body.append(f"<p>{_inline(' '.join(lines[1:]), base)}</p>")
        elif all(ln.lstrip().startswith("|") for ln in lines) and len(lines) >= 2:
            head, rows = _cells(lines[0]), [_cells(ln) for ln in lines[2:]]
            body.append("<table><thead><tr>" + "".join(f"<th>{_inline(c, base)}</th>" for c in head)
                        + "</tr></thead><tbody>"
                        + "".join("<tr>" + "".join(f"<td>{_inline(c, base)}</td>" for c in r) + "</tr>"
                                  for r in rows) + "</tbody></table>")
        elif all(re.match(r"^\s*([-*]|\d+\.) ", ln) or ln.startswith("  ") for ln in lines):
            tag = "ol" if re.match(r"^\s*\d+\. ", first) else "ul"
            items: list[str] = []
            for ln in lines:
                if re.match(r"^\s*([-*]|\d+\.) ", ln):
                    items.append(re.sub(r"^\s*([-*]|\d+\.) ", "", ln))
                else:
                    items[-1] += " " + ln.strip()
            body.append(f"<{tag}>" + "".join(f"<li>{_inline(i, base)}</li>" for i in items) + f"</{tag}>")
        elif all(ln.startswith(">") for ln in lines):
            body.append(f"<blockquote>{_inline(' '.join(ln.lstrip('> ') for ln in lines), base)}</blockquote>")
        elif re.fullmatch(r"!\[[^\]]*\]\([^)\s]+\)", block.strip()):
            body.append(f"<figure>{_inline(block.strip(), base)}</figure>")
        else:
            body.append(f"<p>{_inline(' '.join(lines), base)}</p>")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
