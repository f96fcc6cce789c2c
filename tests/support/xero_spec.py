"""Check HTTP requests (and answers) against Xero's published OpenAPI specs (16.1.0).

The specs are ``tests/specs/xero/accounting-subset.json`` (the Accounting API cut down to the
contact, invoice, organisation, account, tax-rate and currency paths) and
``tests/specs/xero/identity.yaml`` (``/connections``); see ``tests/specs/SOURCES.md``. The token
endpoint (``identity.xero.com/connect/token``) is not in an OpenAPI path, so its form is checked
against the spec's ``RefreshToken`` schema plus RFC 6749's authorization-code fields.

:func:`request_problems` finds the operation for a method and path, checks every query
parameter against the declared ones (name, type, enum; comma-separated arrays), the required
``xero-tenant-id`` header, the ``Idempotency-Key`` length, and validates the JSON body with
``jsonschema`` (Draft 2020-12).

Stricter than the literal spec, on purpose, because the spec lists no ``required`` fields and
never says ``additionalProperties``:

* every object schema that lists ``properties`` is closed in requests, so a misspelt field
  (``InvoiceNumer``) is refused instead of silently ignored;
* ``readOnly`` properties (``Total``, ``AmountDue``, ``UpdatedDateUTC`` ...) may not be sent;
* a GET must not carry a body, and a PUT or POST must carry a JSON object.

Answers are validated with objects left open (Xero adds ``Id``, ``Status``, ``ProviderName``,
``DateTimeUTC`` to every envelope) but with the declared types and enums.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import yaml
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = [
    "ACCOUNTING_PREFIX",
    "SPEC_DIR",
    "Operation",
    "SpecViolation",
    "find_operation",
    "iter_cassette_requests",
    "load_spec",
    "request_problems",
    "response_problems",
    "validate_cassette",
    "validate_request",
]

SPEC_DIR = Path(__file__).resolve().parent.parent / "specs" / "xero"
ACCOUNTING_SPEC = SPEC_DIR / "accounting-subset.json"
IDENTITY_SPEC = SPEC_DIR / "identity.yaml"
ACCOUNTING_PREFIX = "/api.xro/2.0"
TOKEN_PATH = "/connect/token"
CONNECTIONS_PATH = "/connections"
_REQUEST_URI = "urn:kiki:xero-accounting:request"
_RESPONSE_URI = "urn:kiki:xero-accounting:response"
# NOTE: "This allows you to safely retry requests ... 128 character max." (idempotencyKey
# parameter of xero_accounting.yaml).
IDEMPOTENCY_KEY_MAX = 128
_UUID = re.compile(r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")
_TOKEN_FORM = {
    # The spec's RefreshToken schema, plus RFC 6749 4.1.3 for the authorization-code grant.
    "refresh_token": {"grant_type", "refresh_token", "client_id", "client_secret"},
    "authorization_code": {"grant_type", "code", "redirect_uri", "client_id", "code_verifier"},
}


class SpecViolation(AssertionError):
    """A request (or answer) does not conform to Xero's OpenAPI spec."""


@functools.cache
def load_spec() -> dict[str, Any]:
    """The Accounting subset (cached; do not mutate)."""
    with open(ACCOUNTING_SPEC, encoding="utf-8") as handle:
        spec: dict[str, Any] = json.load(handle)
    return spec


@functools.cache
def load_identity_spec() -> dict[str, Any]:
    """The identity spec (``/connections``)."""
    with open(IDENTITY_SPEC, encoding="utf-8") as handle:
        spec: dict[str, Any] = yaml.safe_load(handle)
    return spec


def _prepare(schema: Any, *, request: bool) -> Any:
    """A copy of a schema: objects closed and read-only fields dropped for requests."""
    if isinstance(schema, list):
        return [_prepare(s, request=request) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _prepare(v, request=request) for k, v in schema.items() if k != "example"}
    if "properties" in schema:
        props = {
            k: v
            for k, v in out["properties"].items()
            if not (request and isinstance(v, dict) and v.get("readOnly"))
        }
        out["properties"] = props
        if request:
            out.setdefault("additionalProperties", False)
    if out.pop("nullable", False):
        return {"anyOf": [out, {"type": "null"}]}
    return out


_FORMATS = FormatChecker()


@_FORMATS.checks("uuid")
def _is_uuid(value: object) -> bool:
    return not isinstance(value, str) or bool(_UUID.fullmatch(value))


@functools.cache
def _registry() -> Registry:
    spec = load_spec()
    components = spec["components"]
    resources = [
        (
            uri,
            Resource(
                contents={"components": _prepare(components, request=req)},
                specification=DRAFT202012,
            ),
        )
        for uri, req in ((_REQUEST_URI, True), (_RESPONSE_URI, False))
    ]
    return Registry().with_resources(resources)


@functools.cache
def _validator(pointer: str, request: bool) -> Draft202012Validator:
    base = _REQUEST_URI if request else _RESPONSE_URI
    return Draft202012Validator(
        {"$ref": f"{base}{pointer}"}, registry=_registry(), format_checker=_FORMATS
    )


@dataclass(frozen=True)
class Operation:
    """One operation of the Accounting spec (``PUT /Invoices``)."""

    method: str
    template: str
    operation_id: str
    parameters: Mapping[str, Mapping[str, Any]]
    """Every declared parameter by ``(in):(name)``, e.g. ``query:where``."""
    body_pointer: str | None
    responses: Mapping[str, str]
    """Status -> JSON pointer of the response schema."""

    def matches(self, path: str) -> bool:
        """Whether ``path`` (below ``/api.xro/2.0``) fits the template."""
        regex = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(self.template))
        return re.fullmatch(regex, path) is not None


def _resolve(spec: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if not ref:
        return node
    target: Any = spec
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return _resolve(spec, target)


@functools.cache
def _operations() -> tuple[Operation, ...]:
    spec = load_spec()
    found = []
    for template, item in spec["paths"].items():
        shared = item.get("parameters", [])
        for method, op in item.items():
            if method == "parameters":
                continue
            params: dict[str, Mapping[str, Any]] = {}
            for raw in [*shared, *op.get("parameters", [])]:
                param = _resolve(spec, raw)
                params[f"{param['in']}:{param['name'].lower()}"] = param
            body = None
            content = (op.get("requestBody") or {}).get("content", {}).get("application/json")
            if content:
                body = "#" + content["schema"]["$ref"].removeprefix("#")
            responses = {}
            for status, response in op.get("responses", {}).items():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                if schema and "$ref" in schema:
                    responses[status] = "#" + schema["$ref"].removeprefix("#")
            found.append(
                Operation(method.upper(), template, op["operationId"], params, body, responses)
            )
    return tuple(found)


def find_operation(method: str, path: str) -> Operation:
    """The operation for ``method`` and ``path`` (below ``/api.xro/2.0``).

    Raises:
        SpecViolation: No such operation in the spec.
    """
    literal = [op for op in _operations() if op.method == method.upper() and "{" not in op.template]
    templated = [op for op in _operations() if op.method == method.upper() and "{" in op.template]
    for op in [*literal, *templated]:
        if op.matches(path):
            return op
    raise SpecViolation(f"{method} {ACCOUNTING_PREFIX}{path} is not an operation of the spec")


def _check_param(param: Mapping[str, Any], value: str) -> str | None:
    schema = param.get("schema", {})
    kind = schema.get("type")
    name = param["name"]
    if kind == "boolean" and value not in ("true", "false"):
        return f"query {name}={value!r} is not a boolean (true/false)"
    if kind == "integer" and not re.fullmatch(r"-?\d+", value):
        return f"query {name}={value!r} is not an integer"
    if kind == "array":
        item = schema.get("items", {})
        for part in value.split(","):
            if item.get("format") == "uuid" and not _UUID.fullmatch(part.strip()):
                return f"query {name}: {part!r} is not a UUID"
    if "enum" in schema and value not in schema["enum"]:
        return f"query {name}={value!r} is not one of {schema['enum']}"
    return None


def _body_problems(
    pointer: str, body: Any, *, request: bool, skip: frozenset[str] = frozenset()
) -> list[str]:
    validator = _validator(pointer, request)
    errors = [e for e in validator.iter_errors(body) if e.validator not in skip]
    return [_describe(e) for e in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path])]


def _describe(error: ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"body{where}: {error.message}"


def request_problems(
    method: str,
    url: str,
    body: bytes | str | None,
    headers: Mapping[str, str] | None = None,
    *,
    check_headers: bool = True,
    skip: frozenset[str] = frozenset(),
) -> list[str]:
    """Everything about a request that Xero's spec (read strictly) does not allow.

    Args:
        method: The HTTP method.
        url: The URL, or a path with its query.
        body: The raw body.
        headers: The request headers (any case).
        check_headers: Check the required ``xero-tenant-id`` (off for cassettes, which scrub it).
        skip: JSON Schema keywords not to report (the fake reports ``maxLength`` per element).

    Returns:
        One line per problem; empty when the request conforms.
    """
    parts = urlsplit(url)
    path, query = parts.path, parse_qsl(parts.query, keep_blank_values=True)
    lowered = {k.lower(): v for k, v in (headers or {}).items()}
    text = body.decode("utf-8") if isinstance(body, bytes) else (body or "")
    method = method.upper()
    if path == TOKEN_PATH:
        return _token_problems(method, text)
    if path.lower() == CONNECTIONS_PATH:
        return _connections_problems(method, query, text)
    if not path.startswith(ACCOUNTING_PREFIX + "/"):
        return [f"{method} {path} is not a Xero API path"]
    try:
        op = find_operation(method, path.removeprefix(ACCOUNTING_PREFIX))
    except SpecViolation as exc:
        return [str(exc)]
    problems = []
    for name, value in query:
        param = op.parameters.get(f"query:{name.lower()}")
        if param is None or param["name"] != name:
            problems.append(f"query parameter {name!r} is not declared for {op.operation_id}")
            continue
        problem = _check_param(param, value)
        if problem:
            problems.append(problem)
    if check_headers:
        for key, param in op.parameters.items():
            required = key.startswith("header:") and param.get("required")
            if required and not lowered.get(param["name"].lower()):
                problems.append(f"required header {param['name']} is missing")
    key = lowered.get("idempotency-key")
    if key is not None:
        if "header:idempotency-key" not in op.parameters:
            problems.append(f"{op.operation_id} takes no Idempotency-Key")
        elif len(key) > IDEMPOTENCY_KEY_MAX:
            problems.append(f"Idempotency-Key longer than {IDEMPOTENCY_KEY_MAX} characters")
    if op.body_pointer is None:
        if text.strip():
            problems.append(f"{method} {op.template} takes no body")
        return problems
    try:
        payload = json.loads(text, parse_float=Decimal)
    except ValueError:
        return [*problems, "the body is not JSON"]
    if not isinstance(payload, dict):
        return [*problems, "the body is not a JSON object"]
    return problems + _body_problems(op.body_pointer, payload, request=True, skip=skip)


def _token_problems(method: str, text: str) -> list[str]:
    if method != "POST":
        return [f"{method} {TOKEN_PATH}: the token endpoint takes POST"]
    form = dict(parse_qsl(text, keep_blank_values=True))
    grant = form.get("grant_type", "")
    allowed = _TOKEN_FORM.get(grant)
    if allowed is None:
        return [f"grant_type {grant!r} is not refresh_token or authorization_code"]
    problems = [f"token form field {k!r} is not allowed" for k in form if k not in allowed]
    needed = {"refresh_token"} if grant == "refresh_token" else {"code", "redirect_uri"}
    problems += [f"token form field {k!r} is missing" for k in sorted(needed - set(form))]
    return problems


def _connections_problems(method: str, query: list[tuple[str, str]], text: str) -> list[str]:
    spec = load_identity_spec()
    operation = spec["paths"]["/Connections"].get(method.lower())
    if operation is None:
        return [f"{method} /connections is not an operation of the identity spec"]
    declared = {p["name"] for p in operation.get("parameters", [])}
    problems = [f"query parameter {n!r} is not declared" for n, _ in query if n not in declared]
    if text.strip():
        problems.append("GET /connections takes no body")
    return problems


def validate_request(
    method: str,
    url: str,
    body: bytes | str | None,
    headers: Mapping[str, str] | None = None,
    *,
    check_headers: bool = True,
) -> None:
    """Raise :class:`SpecViolation` listing every problem of a request."""
    problems = request_problems(method, url, body, headers, check_headers=check_headers)
    if problems:
        raise SpecViolation(f"{method} {url}:\n  " + "\n  ".join(problems))


def response_problems(method: str, url: str, status: int, body: bytes | str) -> list[str]:
    """What a JSON answer of the Accounting API does not have right (types, enums, formats)."""
    path = urlsplit(url).path
    if not path.startswith(ACCOUNTING_PREFIX + "/"):
        return []
    op = find_operation(method, path.removeprefix(ACCOUNTING_PREFIX))
    pointer = op.responses.get(str(status))
    if pointer is None:
        return [] if status != 200 else [f"{op.operation_id} declares no 200 schema"]
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    return _body_problems(pointer, json.loads(text, parse_float=Decimal), request=False)


def iter_cassette_requests(path: Path) -> Iterator[tuple[Any, Any]]:
    """The (request, response) pairs of a cassette file."""
    from vcr.serialize import deserialize
    from vcr.serializers import yamlserializer

    requests, responses = deserialize(path.read_text(encoding="utf-8"), yamlserializer)
    yield from zip(requests, responses, strict=True)


def validate_cassette(path: Path) -> int:
    """Validate every request of a cassette (and every JSON answer); return how many.

    Raises:
        SpecViolation: The first request or answer that does not conform.
    """
    count = 0
    for request, response in iter_cassette_requests(path):
        validate_request(
            request.method, request.uri, request.body, request.headers, check_headers=False
        )
        status = response["status"]["code"]
        body = response["body"]["string"]
        if 200 <= status < 300 and urlsplit(request.uri).path.startswith(ACCOUNTING_PREFIX):
            problems = response_problems(request.method, request.uri, status, body)
            if problems:
                raise SpecViolation(f"answer to {request.method} {request.uri}: {problems}")
        count += 1
    return count
