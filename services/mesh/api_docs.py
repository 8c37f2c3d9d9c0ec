"""The REST API's OpenAPI document and a docs page: the bodies the public listener serves at /openapi.json and /docs."""

# The document is generated from proto/ (scripts/gen_protos.py) into the generated `servegrid` package and
# read here as package data, so the router finds it wherever servegrid is installed. Envoy answers both
# paths itself (direct_response, services/mesh/routes.py doc_routes): no service is called and no
# credential is needed, like /healthz. The page is plain HTML with no script and nothing fetched from
# elsewhere (its Content-Security-Policy forbids it): a readable list of the operations, and the document
# for the tools that render one (Swagger UI, Redoc, Postman, schemathesis).

from __future__ import annotations

import functools
import html
import json
from importlib import resources
from typing import Any

OPENAPI_PACKAGE = "servegrid.openapi"
OPENAPI_FILE = "servegrid.openapi.json"
OPENAPI_PATH = "/openapi.json"
DOCS_PATH = "/docs"
# Envoy refuses a route configuration whose direct-response bodies exceed this (4096 unless raised).
ENVOY_DEFAULT_BODY_LIMIT = 4096


@functools.cache
def openapi_document() -> dict[str, Any]:
    text = resources.files(OPENAPI_PACKAGE).joinpath(OPENAPI_FILE).read_text(encoding="utf-8")
    document: dict[str, Any] = json.loads(text)
    return document


@functools.cache
def openapi_json() -> str:
    """The document as served: compact and ASCII-only (its byte length is its length)."""
    return json.dumps(openapi_document(), separators=(",", ":"))


def _paragraphs(text: str) -> str:
    return "".join(f"<p>{html.escape(p.strip())}</p>" for p in text.split("\n\n") if p.strip())


def _operation(path: str, verb: str, operation: dict[str, Any]) -> str:
    parameters = ", ".join(
        f"<code>{html.escape(p['name'])}</code> ({p['in']}{', required' if p.get('required') else ''})"
        for p in operation.get("parameters", [])
    )
    body = "<p>Body: JSON.</p>" if "requestBody" in operation else ""
    return (
        f"<details><summary><code>{verb.upper()} {html.escape(path)}</code> "
        f"{html.escape(operation.get('summary', ''))}</summary>"
        f"{_paragraphs(operation.get('description', ''))}"
        f"{f'<p>Parameters: {parameters}.</p>' if parameters else ''}{body}"
        f"<p>Operation <code>{html.escape(operation['operationId'])}</code>.</p></details>"
    )


def _sections(document: dict[str, Any]) -> str:
    by_tag: dict[str, list[str]] = {tag["name"]: [] for tag in document.get("tags", [])}
    for path, verbs in document["paths"].items():
        for verb, operation in verbs.items():
            by_tag.setdefault(operation["tags"][0], []).append(_operation(path, verb, operation))
    descriptions = {tag["name"]: tag.get("description", "") for tag in document.get("tags", [])}
    return "".join(
        f"<h2>{html.escape(tag)}</h2>{_paragraphs(descriptions.get(tag, ''))}{''.join(items)}"
        for tag, items in by_tag.items()
    )


@functools.cache
def docs_html() -> str:
    """Every operation by service, with its description and parameters; the schemas are in the document."""
    document = openapi_document()
    info = document["info"]
    title = html.escape(f"{info['title']} {info['version']}")
    style = "body{font-family:sans-serif;max-width:60em;margin:auto;padding:1em}summary{cursor:pointer}"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body><h1>{title}</h1>{_paragraphs(info.get('description', ''))}"
        f'<p>The full description, with every schema: <a href="{OPENAPI_PATH}">{OPENAPI_PATH}</a> '
        "(OpenAPI 3.1; load it into any OpenAPI tool).</p>"
        f"{_sections(document)}</body></html>\n"
    )


def max_body_bytes() -> int:
    """The route configuration's max_direct_response_body_size_bytes: room for the largest body served."""
    return max(ENVOY_DEFAULT_BODY_LIMIT, len(openapi_json()), len(docs_html().encode()))
