"""The HTML of the report page: escaping, value formatting, tables, and the page itself (a Jinja2 template)."""

from __future__ import annotations

import html
from typing import Any

from kinds.base import fmt  # noqa: F401 (re-exported: the report's cells and the kinds' sentences format alike)


def esc(v: Any) -> str:
    """HTML-escaped text of `v` (attributes included)."""
    return html.escape(str(v), quote=True)


def fmt_seconds(s: float | None) -> str:
    """12.3 s, 4 min 5 s, 2 h 3 min."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {s % 60:.0f} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def table(rows: list[dict[str, Any]], cols: list[str], headers: list[str] | None = None) -> str:
    if not rows:
        return '<p class="muted">(none)</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in (headers or cols))
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, job: dict[str, Any], made: str, nav: list[tuple[str, str]], sections: list[str]) -> str:
    """The whole page: templates/report.html.j2 around the sections' (already escaped) HTML."""
    from jinja2 import Environment, PackageLoader, select_autoescape
    from markupsafe import Markup

    env = Environment(loader=PackageLoader("orchestrator", "templates"), autoescape=select_autoescape(["j2"]),
                      keep_trailing_newline=True)
    return env.get_template("report.html.j2").render(title=title, job=job, made=made, nav=nav,
                                                     sections=[Markup(s) for s in sections])
