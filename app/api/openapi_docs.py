"""The /docs page: an OpenAPI document (app.api.openapi) as one plain HTML page, with no script and
nothing fetched, so it works on a machine without internet access."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

_STYLE = """
body{font:15px/1.5 system-ui,sans-serif;max-width:72rem;margin:2rem auto;padding:0 1rem;color:#222}
code{font-family:ui-monospace,monospace;background:#f3f3f3;padding:0 .2em}
table{border-collapse:collapse;width:100%;margin:.4rem 0 1rem}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
section{border-top:1px solid #ccc;margin-top:1.5rem}
.m{font:bold 13px ui-monospace,monospace;padding:.1em .4em;border-radius:3px;color:#fff}
.get{background:#2a7a4a}.post{background:#2a5fb0}.delete{background:#a33a2a}
"""


def _text(value: Any) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(value)))


def _type(schema: Mapping[str, Any]) -> str:
    """A schema as a short, linked type expression: `string | null`, `array of Model`."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return f'<a href="#schema-{html.escape(name)}">{html.escape(name)}</a>'
    if "anyOf" in schema or "oneOf" in schema:
        return " | ".join(_type(s) for s in schema.get("anyOf", schema.get("oneOf", [])))
    if "const" in schema:
        return f"<code>{html.escape(orjson.dumps(schema['const']).decode())}</code>"
    if "enum" in schema:
        return "one of " + ", ".join(
            f"<code>{html.escape(orjson.dumps(v).decode())}</code>" for v in schema["enum"]
        )
    kind = schema.get("type")
    if kind == "array":
        return "array of " + _type(schema.get("items", {}))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return "map of " + _type(schema["additionalProperties"])
    return html.escape(" | ".join(kind) if isinstance(kind, list) else str(kind or "any"))


_LIMITS = (
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "default",
)


def _limits(schema: Mapping[str, Any]) -> str:
    found = [
        (key, value)
        for s in [schema, *schema.get("anyOf", [])]
        for key, value in s.items()
        if key in _LIMITS
    ]
    return "; ".join(
        f"{key} <code>{html.escape(orjson.dumps(value).decode())}</code>" for key, value in found
    )


def _table(head: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>"


def _auth(op: Mapping[str, Any]) -> str:
    if "x-scope" in op:
        return f"API key (<code>Authorization: Bearer</code>) with the {op['x-scope']} scope"
    if op.get("security"):
        return "a peer region's federation signature"
    return "none"


def _operation_html(document: Mapping[str, Any], method: str, path: str, op: Any) -> str:
    parts = [
        f'<section id="op-{op["operationId"]}"><h3><span class="m {method}">{method.upper()}'
        f"</span> <code>{html.escape(path)}</code> {_text(op['summary'])}</h3>",
        f"<p>{_text(op.get('description', ''))}</p><p>Authentication: {_auth(op)}</p>",
    ]
    if op.get("parameters"):
        rows = [
            (f"<code>{p['name']}</code>", p["in"], _type(p["schema"]),
             "yes" if p["required"] else "no", _text(p["description"]))
            for p in op["parameters"]
        ]  # fmt: skip
        parts.append(_table(("Parameter", "In", "Type", "Required", "Description"), rows))
    for media, content in op.get("requestBody", {}).get("content", {}).items():
        parts.append(f"<p>Request body ({media}): {_type(content['schema'])}</p>")
    answers = [_response_row(document, status, r) for status, r in op["responses"].items()]
    parts.append(_table(("Status", "Meaning", "Body", "Headers"), answers) + "</section>")
    return "\n".join(parts)


def _response_row(document: Mapping[str, Any], status: str, response: Any) -> tuple[str, ...]:
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    bodies = [
        f"{media}: {_type(c['schema'])}"
        + (f", events of {_type(c['x-event-schema'])}" if "x-event-schema" in c else "")
        for media, c in response["content"].items()
    ]
    heads = ", ".join(f"<code>{h}</code>" for h in response.get("headers", {}))
    return status, _text(response["description"]), "<br>".join(bodies), heads


def _schema_html(name: str, schema: Mapping[str, Any]) -> str:
    head = f'<section id="schema-{html.escape(name)}"><h3>{html.escape(name)}</h3>'
    about = f"<p>{_text(schema['description'])}</p>" if "description" in schema else ""
    if "properties" not in schema:
        return f"{head}{about}<p>{_type(schema)}</p></section>"
    required = set(schema.get("required", []))
    rows = [
        (
            f"<code>{html.escape(field)}</code>",
            _type(prop),
            "yes" if field in required else "no",
            " ".join(filter(None, (_text(prop.get("description", "")), _limits(prop)))),
        )
        for field, prop in schema["properties"].items()
    ]
    return f"{head}{about}{_table(('Field', 'Type', 'Required', 'Notes'), rows)}</section>"


def docs_html(document: Mapping[str, Any]) -> str:
    """The document as one self-contained HTML page: operations, then schemas."""
    info = document["info"]
    ops = [
        (method, path, op)
        for path, item in document["paths"].items()
        for method, op in item.items()
    ]
    index = "".join(
        f'<li><a href="#op-{op["operationId"]}"><span class="m {method}">{method.upper()}</span> '
        f"<code>{html.escape(path)}</code></a> {_text(op['summary'])}</li>"
        for method, path, op in ops
    )
    servers = ", ".join(f"<code>{html.escape(s['url'])}</code>" for s in document["servers"])
    return "\n".join(
        [
            f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>{html.escape(info['title'])}</title><style>{_STYLE}</style></head><body>",
            f"<h1>{html.escape(info['title'])} <small>{html.escape(info['version'])}</small></h1>",
            f"<p>{_text(info['description'])}</p><p>Base URL: {servers} "
            f'(<a href="openapi.json">openapi.json</a>)</p>',
            f"<h2>Operations</h2><ul>{index}</ul>",
            *(_operation_html(document, method, path, op) for method, path, op in ops),
            "<h2>Schemas</h2>",
            *(_schema_html(name, s) for name, s in document["components"]["schemas"].items()),
            "</body></html>",
        ]
    )
