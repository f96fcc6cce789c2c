"""Check HTTP requests against Stripe's published OpenAPI spec (API version 2023-08-16).

The spec is ``tests/specs/stripe/invoicing-subset.json`` (see ``tests/specs/SOURCES.md``): Stripe's
``spec3.yaml`` cut down to the customer, invoice and invoice-item endpoints.

Stripe's v1 API takes ``application/x-www-form-urlencoded`` bodies (and query strings) in "bracket
notation": ``metadata[kiki_invoice]=X``, ``expand[]=customer`` or ``expand[0]=customer``,
``custom_fields[0][name]=PO``. Every value on the wire is a string. :func:`validate_stripe_request`

1. finds the operation (``POST /v1/invoices/{invoice}/finalize``) for the method and path;
2. decodes the query string and the body into nested data (:func:`decode_form`);
3. coerces the strings to the types the schema asks for (``"100"`` -> ``100``, ``"true"`` ->
   ``True``, a ``{"0": ..}`` mapping -> a list), trying each branch of an ``anyOf`` (Stripe writes
   "this may be unset" as ``anyOf: [<schema>, {enum: [""]}]``);
4. validates the result with ``jsonschema`` (Draft 2020-12).

Strictness beyond the literal spec, on purpose (Stripe's API behaves this way):

* every object schema that lists ``properties`` but says nothing about ``additionalProperties`` is
  closed (Stripe rejects ``automatic_tax[bogus]`` with "Received unknown parameter"); ``metadata``
  stays open because the spec gives it ``additionalProperties: {type: string}``;
* a GET or DELETE must not carry a body.

Looser than the literal spec, on purpose: an ``enum`` marked ``x-stripeBypassValidation: true`` is
not enforced (Stripe's own marker for "do not validate this enum client-side").

Why not ``openapi-core``: version 0.23 rejects even valid Stripe form bodies
(``DeserializeError('deepObject', 'account_tax_ids')`` for a property that is absent) and has no
notion of ``a[0][b]`` arrays of objects, so this module decodes the form itself.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry
from referencing.jsonschema import DRAFT202012

__all__ = [
    "SPEC_PATH",
    "FormDecodeError",
    "Operation",
    "Problem",
    "SpecViolation",
    "as_list",
    "coerce_form_value",
    "decode_form",
    "encode_form",
    "find_operation",
    "iter_cassette_requests",
    "load_spec",
    "request_problems",
    "validate_cassette",
    "validate_stripe_request",
    "validate_stripe_response",
]

SPEC_PATH = Path(__file__).resolve().parent.parent / "specs" / "stripe" / "invoicing-subset.json"
"""The cut-down Stripe OpenAPI spec the validators use."""

SPEC_API_VERSION = "2023-08-16"
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_SPEC_URI = "urn:kiki:stripe-openapi"
_INTEGER_RE = re.compile(r"[+-]?\d+")
_KEY_RE = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_SEGMENT_RE = re.compile(r"\[([^\[\]]*)\]")
_BODYLESS_METHODS = frozenset({"GET", "DELETE", "HEAD"})


class SpecViolation(AssertionError):
    """A request (or response) does not conform to Stripe's OpenAPI spec."""


class FormDecodeError(ValueError):
    """A form body or query string is not valid Stripe bracket notation."""


# --------------------------------------------------------------------------------------------
# Stripe's bracket notation
# --------------------------------------------------------------------------------------------


def parse_form_pairs(data: bytes | str | None) -> list[tuple[str, str]]:
    """Split a urlencoded string into ``(name, value)`` pairs, keeping blank values."""
    if data is None:
        return []
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormDecodeError(f"form data is not UTF-8: {exc}") from exc
    return parse_qsl(data, keep_blank_values=True)


def decode_form(data: bytes | str | Sequence[tuple[str, str]] | None) -> dict[str, Any]:
    """Decode Stripe bracket notation into nested dicts and lists of strings.

    ``a=1`` -> ``{"a": "1"}``; ``a[b]=1`` -> ``{"a": {"b": "1"}}``; ``a[]=x&a[]=y`` ->
    ``{"a": ["x", "y"]}``; ``a[0][b]=y`` -> ``{"a": {"0": {"b": "y"}}}`` (indexed keys stay a
    mapping here because ``metadata[0]=x`` is legal; see :func:`as_list`).

    Raises:
        FormDecodeError: for a malformed name (``a[b``), a name given twice, or a name used both
            as a scalar and as a container (``a=1&a[b]=2``).
    """
    pairs = data if isinstance(data, Sequence) and not isinstance(data, str | bytes) else None
    if pairs is None:
        pairs = parse_form_pairs(data)  # type: ignore[arg-type]
    root: dict[str, Any] = {}
    for raw_key, value in pairs:
        match = _KEY_RE.fullmatch(raw_key)
        if match is None:
            raise FormDecodeError(f"malformed parameter name {raw_key!r}")
        segments = [match.group(1), *_SEGMENT_RE.findall(match.group(2))]
        _assign(root, segments, value, raw_key)
    return root


def _assign(node: dict[str, Any] | list[Any], segments: list[str], value: str, raw: str) -> None:
    """Store ``value`` at ``segments`` below ``node`` (helper of :func:`decode_form`)."""
    head, rest = segments[0], segments[1:]
    if isinstance(node, list):  # head is "" (an ``a[]`` segment)
        if not rest:
            node.append(value)
            return
        following = rest[0]
        last = node[-1] if node else None
        if following and isinstance(last, dict) and following not in last:
            child: dict[str, Any] | list[Any] = last  # a[][name]=x&a[][value]=y: one element
        else:
            child = [] if following == "" else {}
            node.append(child)
        _assign(child, rest, value, raw)
        return
    if not rest:
        if head in node:
            raise FormDecodeError(f"parameter {raw!r} is given twice or also used as a container")
        node[head] = value
        return
    wants_list = rest[0] == ""
    existing = node.get(head)
    if existing is None:
        existing = [] if wants_list else {}
        node[head] = existing
    elif isinstance(existing, str) or isinstance(existing, list) != wants_list:
        raise FormDecodeError(f"parameter {raw!r} conflicts with an earlier use of {head!r}")
    _assign(existing, rest, value, raw)


def as_list(value: Any) -> list[Any] | None:
    """Return ``value`` as a list if it is one or an index-keyed mapping (``{"0": .., "1": ..}``).

    Returns None for anything else. The Stripe SDK encodes lists as ``a[0]=x&a[1]=y``.
    """
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and value and all(k.isdigit() for k in value):
        return [value[k] for k in sorted(value, key=int)]
    return None


def coerce_form_value(value: Any, schema: Mapping[str, Any]) -> Any:
    """Turn decoded form strings into the JSON types ``schema`` asks for, where they parse.

    Strings that do not parse (``"abc"`` for an integer) are left alone so that validation
    reports them. For ``anyOf`` the first branch that validates after coercion wins.
    """
    if "anyOf" in schema:
        branches: list[Mapping[str, Any]] = schema["anyOf"]
        for branch in branches:
            candidate = coerce_form_value(value, branch)
            if _fragment_validator(branch).is_valid(candidate):
                return candidate
        return coerce_form_value(value, _branch_for_shape(value, branches))
    kind = schema.get("type")
    if kind == "array":
        items = as_list(value)
        if items is None:
            return value
        item_schema = schema.get("items", {})
        return [coerce_form_value(item, item_schema) for item in items]
    if isinstance(value, dict):
        if kind != "object" and "properties" not in schema:
            return value
        properties: Mapping[str, Any] = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, sub in value.items():
            sub_schema = properties.get(key, extra if isinstance(extra, dict) else None)
            out[key] = sub if sub_schema is None else coerce_form_value(sub, sub_schema)
        return out
    if isinstance(value, str):
        if kind == "integer" and _INTEGER_RE.fullmatch(value):
            return int(value)
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                return value
            return number if math.isfinite(number) else value
        if kind == "boolean" and value in ("true", "false"):
            return value == "true"
    return value


def _branch_for_shape(value: Any, branches: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Pick the ``anyOf`` branch whose type fits ``value``'s shape, for a precise error."""
    for branch in branches:
        kind = branch.get("type")
        if isinstance(value, dict):
            if kind == "object" or (kind == "array" and as_list(value) is not None):
                return branch
        elif isinstance(value, list):
            if kind == "array":
                return branch
        elif kind not in ("object", "array") and branch.get("enum") != [""]:
            return branch
    return branches[0]


# --------------------------------------------------------------------------------------------
# Loading and preparing the spec
# --------------------------------------------------------------------------------------------


@functools.cache
def load_spec(path: str | Path = SPEC_PATH) -> dict[str, Any]:
    """Load the OpenAPI document as JSON (cached; do not mutate the result)."""
    with open(path, encoding="utf-8") as handle:
        spec: dict[str, Any] = json.load(handle)
    return spec


def _prepare_request_schema(schema: Any) -> Any:
    """Copy a request schema: close objects, drop bypassed enums, translate ``nullable``."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _prepare_request_schema(v) for k, v in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _prepare_request_schema(out["additionalProperties"])
    if "items" in out:
        out["items"] = _prepare_request_schema(out["items"])
    for keyword in ("anyOf", "oneOf", "allOf"):
        if keyword in out:
            out[keyword] = [_prepare_request_schema(s) for s in out[keyword]]
    if out.get("x-stripeBypassValidation") and "enum" in out:
        del out["enum"]
    return _translate_nullable(out)


def _prepare_response_schema(schema: Any) -> Any:
    """Copy a response schema, translating OpenAPI 3.0 ``nullable`` (objects stay open)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {k: _prepare_response_schema(v) for k, v in out["properties"].items()}
    for keyword in ("additionalProperties", "items"):
        if isinstance(out.get(keyword), dict):
            out[keyword] = _prepare_response_schema(out[keyword])
    for keyword in ("anyOf", "oneOf", "allOf"):
        if keyword in out:
            out[keyword] = [_prepare_response_schema(s) for s in out[keyword]]
    return _translate_nullable(out)


def _translate_nullable(schema: dict[str, Any]) -> dict[str, Any]:
    """Rewrite OpenAPI 3.0 ``nullable: true`` as JSON Schema ``anyOf [.., {type: null}]``."""
    if not schema.pop("nullable", False):
        return schema
    annotations = {k: schema.pop(k) for k in ("description", "title") if k in schema}
    return {"anyOf": [schema, {"type": "null"}], **annotations}


_FORMAT_CHECKER = FormatChecker()


@_FORMAT_CHECKER.checks("decimal", raises=(InvalidOperation, ValueError))
def _is_decimal(value: object) -> bool:
    """Stripe's ``format: decimal`` is a decimal number written as a string."""
    if not isinstance(value, str):
        return True
    return Decimal(value).is_finite()


_FRAGMENT_VALIDATORS: dict[int, tuple[Mapping[str, Any], Draft202012Validator]] = {}


def _fragment_validator(schema: Mapping[str, Any]) -> Draft202012Validator:
    """A cached validator for a ``$ref``-free request-schema fragment (an ``anyOf`` branch)."""
    cached = _FRAGMENT_VALIDATORS.get(id(schema))
    if cached is None or cached[0] is not schema:
        cached = (schema, Draft202012Validator(schema, format_checker=_FORMAT_CHECKER))
        _FRAGMENT_VALIDATORS[id(schema)] = cached
    return cached[1]


@dataclass(frozen=True)
class Operation:
    """One operation of the spec, e.g. ``POST /v1/invoices/{invoice}/finalize``."""

    method: str
    template: str
    operation_id: str
    query_params: Mapping[str, Mapping[str, Any]]
    """Declared query parameters: name -> prepared parameter object (with ``schema``)."""
    path_params: Mapping[str, Mapping[str, Any]]
    body_schema: Mapping[str, Any] | None
    """Prepared ``application/x-www-form-urlencoded`` schema, None if there is no body."""
    responses: Mapping[str, str] = field(default_factory=dict)
    """Status (or ``default``) -> JSON pointer of the JSON response schema in the spec."""

    def matches(self, path: str) -> dict[str, str] | None:
        """Return the path parameters if ``path`` fits this operation's template."""
        found = _template_regex(self.template).fullmatch(path)
        return None if found is None else found.groupdict()


@functools.cache
def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
    return re.compile(pattern)


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


@functools.cache
def _operations() -> tuple[Operation, ...]:
    """Every operation of the spec, literal paths first (``/search`` before ``/{invoice}``)."""
    spec = load_spec()
    operations: list[Operation] = []
    for template, item in spec["paths"].items():
        for method, op in item.items():
            if method.startswith("x-") or not isinstance(op, dict):
                continue
            params = [*item.get("parameters", []), *op.get("parameters", [])]
            query = {p["name"]: _prepare_param(p) for p in params if p["in"] == "query"}
            path_params = {p["name"]: _prepare_param(p) for p in params if p["in"] == "path"}
            content = (op.get("requestBody") or {}).get("content", {})
            form = content.get(FORM_CONTENT_TYPE)
            body_schema = _prepare_request_schema(form["schema"]) if form else None
            responses = {
                status: _pointer(
                    "paths",
                    template,
                    method,
                    "responses",
                    status,
                    "content",
                    "application/json",
                    "schema",
                )
                for status, response in op.get("responses", {}).items()
                if "application/json" in response.get("content", {})
            }
            operations.append(
                Operation(
                    method.upper(),
                    template,
                    op.get("operationId", ""),
                    query,
                    path_params,
                    body_schema,
                    responses,
                )
            )
    operations.sort(key=lambda o: (o.template.count("{"), -len(o.template)))
    return tuple(operations)


def _prepare_param(param: Mapping[str, Any]) -> dict[str, Any]:
    return {**param, "schema": _prepare_request_schema(param.get("schema", {}))}


def find_operation(method: str, path: str) -> tuple[Operation, dict[str, str]]:
    """Return the operation for ``method`` and ``path`` (no query) and its path parameters.

    Raises:
        SpecViolation: the path is not in the spec, or not with that method.
    """
    method = method.upper()
    allowed: list[str] = []
    for operation in _operations():
        params = operation.matches(path)
        if params is None:
            continue
        if operation.method == method:
            return operation, params
        allowed.append(operation.method)
    if allowed:
        raise SpecViolation(
            f"{method} {path}: the spec has no {method} for this path "
            f"(it has {', '.join(sorted(set(allowed)))})"
        )
    raise SpecViolation(f"{method} {path}: unknown path; no operation in the Stripe spec matches")


@functools.cache
def _body_validator(method: str, template: str) -> Draft202012Validator:
    operation = next(o for o in _operations() if (o.method, o.template) == (method, template))
    assert operation.body_schema is not None
    return Draft202012Validator(operation.body_schema, format_checker=_FORMAT_CHECKER)


@functools.cache
def _registry() -> Registry:
    """A registry holding the whole spec (``nullable`` translated) for ``$ref`` resolution."""
    spec = load_spec()
    prepared = {
        "paths": {
            template: {
                method: {
                    "responses": {
                        status: {
                            "content": {
                                ctype: {"schema": _prepare_response_schema(media.get("schema"))}
                                for ctype, media in response.get("content", {}).items()
                            }
                        }
                        for status, response in op.get("responses", {}).items()
                    }
                }
                for method, op in item.items()
                if isinstance(op, dict)
            }
            for template, item in spec["paths"].items()
        },
        "components": {
            "schemas": {
                name: _prepare_response_schema(schema)
                for name, schema in spec["components"]["schemas"].items()
            }
        },
    }
    resource = DRAFT202012.create_resource(prepared)
    return Registry().with_resource(_SPEC_URI, resource)


@functools.cache
def _response_validator(pointer: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"{_SPEC_URI}#{pointer}"}, registry=_registry())


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _location(prefix: str | None, path: Iterable[str | int]) -> str:
    """Render a parameter location in bracket notation: ``custom_fields[0][name]``."""
    parts = [str(p) for p in path]
    if prefix is not None:
        parts.insert(0, prefix)
    if not parts:
        return "(top level)"
    return parts[0] + "".join(f"[{p}]" for p in parts[1:])


@dataclass(frozen=True)
class Problem:
    """One way in which a request departs from the spec."""

    where: str
    """``path``, ``query``, ``body`` or ``response``."""
    param: str
    """The parameter in bracket notation (``automatic_tax[enabled]``), or ``""``."""
    kind: str
    """``unknown``, ``missing``, ``type``, ``enum``, ``invalid``, ``malformed`` or ``body``."""
    message: str
    value: Any = None
    expected: Any = None
    """The expected type name (``integer``) or the list of enum values."""

    def __str__(self) -> str:
        return (
            f"{self.where} {self.param}: {self.message}"
            if self.param
            else (f"{self.where}: {self.message}")
        )


def _problems(errors: Iterable[ValidationError], where: str, prefix: str | None) -> list[Problem]:
    """Turn jsonschema errors into one :class:`Problem` per offending parameter."""
    problems: list[Problem] = []
    for error in errors:
        if error.validator in ("anyOf", "oneOf") and error.context:
            # Report against the branch that fits the value's shape (the array in
            # ``anyOf: [array, enum [""]]``) rather than "not valid under any of the schemas".
            branches = error.validator_value
            chosen = _branch_for_shape(error.instance, branches)
            index = next(i for i, b in enumerate(branches) if b is chosen)
            inner = [e for e in error.context if e.relative_schema_path[0] == index]
            if inner:
                problems.extend(_problems(inner, where, prefix))
                continue
        best = best_match([error]) if error.context else error
        at = list(best.absolute_path)
        if best.validator == "additionalProperties" and isinstance(best.instance, dict):
            declared = best.schema.get("properties", {})
            for extra in sorted(k for k in best.instance if k not in declared):
                problems.append(
                    Problem(
                        where,
                        _location(prefix, [*at, extra]),
                        "unknown",
                        "unknown parameter",
                        best.instance[extra],
                    )
                )
        elif best.validator == "required" and isinstance(best.instance, dict):
            for missing in best.validator_value:
                if missing not in best.instance:
                    problems.append(
                        Problem(
                            where,
                            _location(prefix, [*at, missing]),
                            "missing",
                            "required parameter is missing",
                        )
                    )
        elif best.validator == "type" and isinstance(best.instance, str):
            problems.append(
                Problem(
                    where,
                    _location(prefix, at),
                    "type",
                    f"{best.instance!r} is not a valid {best.validator_value}",
                    best.instance,
                    best.validator_value,
                )
            )
        elif best.validator == "enum":
            problems.append(
                Problem(
                    where,
                    _location(prefix, at),
                    "enum",
                    best.message,
                    best.instance,
                    best.validator_value,
                )
            )
        else:
            problems.append(
                Problem(where, _location(prefix, at), "invalid", best.message, best.instance)
            )
    return problems


def _check_params(
    values: Mapping[str, Any], declared: Mapping[str, Mapping[str, Any]], where: str
) -> list[Problem]:
    problems: list[Problem] = []
    for name, raw in values.items():
        param = declared.get(name)
        if param is None:
            known = ", ".join(sorted(declared)) or "none"
            problems.append(
                Problem(where, name, "unknown", f"unknown parameter (declared: {known})", raw)
            )
            continue
        schema = param["schema"]
        value = coerce_form_value(raw, schema)
        problems.extend(_problems(_fragment_validator(schema).iter_errors(value), where, name))
    for name, param in declared.items():
        if param.get("required") and name not in values:
            problems.append(Problem(where, name, "missing", "required parameter is missing"))
    return problems


def request_problems(
    method: str, url: str, body: bytes | str | None
) -> tuple[Operation, list[Problem]]:
    """Return the operation and every :class:`Problem` of a request (empty list: conforms).

    Raises:
        SpecViolation: the path (or the method for it) is not in the spec at all.
    """
    method = method.upper()
    parts = urlsplit(url)
    operation, path_values = find_operation(method, parts.path)
    problems = _check_params(path_values, operation.path_params, "path")
    try:
        query = decode_form(parts.query)
    except FormDecodeError as exc:
        problems.append(Problem("query", "", "malformed", str(exc)))
    else:
        problems.extend(_check_params(query, operation.query_params, "query"))
    if body is not None and not isinstance(body, str | bytes | bytearray):
        raise TypeError(f"body must be bytes, str or None, not {type(body).__name__}")
    has_body = bool(body)
    if method in _BODYLESS_METHODS:
        if has_body:
            problems.append(
                Problem(
                    "body", "", "body", f"a {method} request must not have a body (use the query)"
                )
            )
    elif operation.body_schema is None:
        if has_body:
            problems.append(
                Problem("body", "", "body", f"the operation takes no {FORM_CONTENT_TYPE} body")
            )
    else:
        try:
            form = decode_form(body)
        except FormDecodeError as exc:
            problems.append(Problem("body", "", "malformed", str(exc)))
        else:
            value = coerce_form_value(form, operation.body_schema)
            errors = _body_validator(operation.method, operation.template).iter_errors(value)
            problems.extend(_problems(errors, "body", None))
    return operation, problems


def validate_stripe_request(method: str, url: str, body: bytes | str | None) -> None:
    """Check one request against the spec; return None or raise :class:`SpecViolation`.

    Args:
        method: HTTP method, any case.
        url: absolute URL or path, with the query string (any host: the fake's too).
        body: the raw urlencoded body (``None`` or empty for none).

    Raises:
        SpecViolation: listing every problem found (unknown path or method, undeclared or
            invalid query or body parameters, missing required parameters, a body on a GET).
    """
    operation, problems = request_problems(method, url, body)
    if problems:
        raise SpecViolation(
            f"{method.upper()} {urlsplit(url).path} does not conform to Stripe's OpenAPI spec "
            f"(API {SPEC_API_VERSION}, operation {operation.operation_id}):\n  - "
            + "\n  - ".join(str(p) for p in problems)
        )


def validate_stripe_response(
    method: str, url: str, status: int, body: bytes | str | Mapping[str, Any]
) -> None:
    """Check a JSON response body against the spec's response schema for that status.

    Objects are not closed here (Stripe adds fields over time); ``nullable`` is honoured.

    Raises:
        SpecViolation: the body is not JSON or does not match the schema.
    """
    operation, _ = find_operation(method, urlsplit(url).path)
    pointer = operation.responses.get(str(status)) or operation.responses.get("default")
    if pointer is None:
        raise SpecViolation(f"{method} {url}: the spec declares no JSON response for {status}")
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise SpecViolation(f"{method} {url}: response is not JSON: {exc}") from exc
    else:
        data = body
    errors = list(_response_validator(pointer).iter_errors(data))
    if errors:
        lines = "\n  - ".join(str(p) for p in _problems(errors, "response", None))
        raise SpecViolation(
            f"{method} {url} -> {status}: response does not match the spec "
            f"({operation.operation_id}):\n  - {lines}"
        )


# --------------------------------------------------------------------------------------------
# Cassettes
# --------------------------------------------------------------------------------------------


def iter_cassette_requests(path: str | Path) -> Iterator[tuple[str, str, bytes | str | None]]:
    """Yield ``(method, uri, body)`` for every interaction of a vcrpy YAML cassette.

    Uses vcrpy's own (safe) loader, so ``!!binary`` bodies come back as bytes.
    """
    from vcr.serialize import deserialize
    from vcr.serializers import yamlserializer

    text = Path(path).read_text(encoding="utf-8")
    requests = deserialize(text, yamlserializer)[0]
    for request in requests:
        yield request.method, request.uri, request.body


def validate_cassette(path: str | Path, *, host: str | None = "api.stripe.com") -> int:
    """Validate every request to ``host`` (None: every request) in a cassette.

    Returns:
        The number of requests validated.

    Raises:
        SpecViolation: naming the cassette and the interaction index.
    """
    count = 0
    for index, (method, uri, body) in enumerate(iter_cassette_requests(path)):
        if host is not None and urlsplit(uri).hostname != host:
            continue
        try:
            validate_stripe_request(method, uri, body)
        except SpecViolation as exc:
            raise SpecViolation(f"{path}, interaction {index}: {exc}") from None
        count += 1
    return count


def encode_form(params: Mapping[str, Any]) -> str:
    """Encode nested params in Stripe's bracket notation, as the Stripe SDK does.

    Lists become ``a[0]=..``, booleans ``true``/``false``, None values are skipped. Useful to
    build request bodies in tests.
    """
    pairs: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}[{key}]", sub)
        elif isinstance(value, list | tuple):
            for index, sub in enumerate(value):
                walk(f"{prefix}[{index}]", sub)
        elif isinstance(value, bool):
            pairs.append((prefix, "true" if value else "false"))
        else:
            pairs.append((prefix, str(value)))

    for key, value in params.items():
        walk(str(key), value)
    return "&".join(f"{quote(k, safe='[]')}={quote(v, safe='')}" for k, v in pairs)
