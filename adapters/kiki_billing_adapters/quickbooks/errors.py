"""QuickBooks Online's errors, classified: Intuit's fault codes and throttle signals first.

What reaches :func:`classify_quickbooks_error`:

- python-quickbooks exceptions (its codes: 1-499 ``AuthorizationException``, 600-1999
  ``GeneralException``, 2000-4999 ``ValidationException``, 5000-9999 the base
  ``QuickbooksException``, and ``10000`` with the raw body in ``.message`` for a non-JSON body or a
  JSON body without ``Fault``); the adapter attaches the HTTP response as ``kiki_response``;
- intuit-oauth's ``AuthClientError`` from the token endpoint (``invalid_grant``, ...);
- ``requests`` errors (no response).
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kiki_billing.plugin import (
    CredentialsExpired,
    DeliveryError,
    RateLimitedError,
    TerminalError,
    TransientError,
    classify_http_status,
    parse_retry_after,
    scrub_secrets,
)

from .sdk import load_sdks

# NOTE: Intuit asks throttled clients (HTTP 429 / fault 3001 "ThrottleExceeded") to wait 60 s
# before retrying (developer.intuit.com "Rate limits and throttles"); 503s likewise.
THROTTLE_WAIT = 60.0
THROTTLE_CODE = "3001"
MAX_MESSAGE = 400
_TOKEN_PATTERNS = (
    re.compile(r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+"),
    re.compile(r"eyJ[A-Za-z0-9_-]{8,}(?:\.[A-Za-z0-9_-]*)*"),  # JWT/JWE access tokens
    re.compile(r"\bAB\d{2}[A-Za-z0-9]{20,}"),  # Intuit refresh tokens
)
_SDK_STATUS = re.compile(r"status code '(\d{3})'")


@dataclass(frozen=True)
class IntuitFault:
    """The first ``Error`` of an Intuit ``Fault`` (JSON or XML), or what an HTML page says."""

    message: str
    detail: str = ""
    code: str | None = None
    element: str | None = None
    fault_type: str | None = None

    @property
    def text(self) -> str:
        """``Message: Detail`` (the detail only when it adds something)."""
        if self.detail and self.detail != self.message:
            return f"{self.message}: {self.detail}" if self.message else self.detail
        return self.message

    @property
    def throttled(self) -> bool:
        """Intuit's ThrottleExceeded (code 3001), whatever the HTTP status."""
        return self.code == THROTTLE_CODE or "ThrottleExceeded" in self.message


def _field(mapping: Mapping[str, Any], name: str) -> Any:
    """A key of Intuit's JSON in either case (the API says ``Fault``, its gateway ``fault``)."""
    if name in mapping:
        return mapping[name]
    return mapping.get(name[0].lower() + name[1:])


def parse_fault(body: str | bytes | None) -> IntuitFault | None:
    """Intuit's fault from a response body: JSON, XML (``IntuitResponse``) or an HTML page.

    Returns:
        The first error, or None for an empty body or one that says nothing readable.
    """
    if body is None:
        return None
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        return _json_fault(text)
    if text.startswith("<"):
        return _xml_fault(text) or _html_fault(text)
    return IntuitFault(_shorten(text))


def _json_fault(text: str) -> IntuitFault | None:
    try:
        data = json.loads(text)
    except ValueError:
        return IntuitFault(_shorten(text))
    if not isinstance(data, dict):
        return None
    fault = _field(data, "Fault")
    if not isinstance(fault, dict):
        error = data.get("error")  # OAuth endpoints: {"error": "invalid_grant"}
        return IntuitFault(str(error), code=str(error)) if isinstance(error, str) else None
    errors = _field(fault, "Error") or []
    first = errors[0] if isinstance(errors, list) and errors else {}
    if not isinstance(first, dict):
        first = {}
    code = first.get("code")
    return IntuitFault(
        message=str(_field(first, "Message") or ""),
        detail=str(_field(first, "Detail") or ""),
        code=str(code) if code not in (None, "") else None,
        element=str(first["element"]) if first.get("element") else None,
        fault_type=str(fault["type"]) if fault.get("type") else None,
    )


def _xml_text(tag: str, text: str) -> str:
    found = re.search(rf"<(?:\w+:)?{tag}\b[^>]*>(.*?)</(?:\w+:)?{tag}>", text, re.S)
    return html.unescape(found.group(1).strip()) if found else ""


def _xml_fault(text: str) -> IntuitFault | None:
    # NOTE: QBO answers some throttles with an XML IntuitResponse even to JSON clients
    # (quickbooks-ruby spec/fixtures/too_many_requests_error.xml; PROVIDERS.md). Read with
    # patterns rather than an XML parser: the body is untrusted and only three fields matter.
    error = re.search(r"<(?:\w+:)?Error\b([^>]*)>", text)
    if error is None:
        return None
    code = re.search(r'\bcode="([^"]*)"', error.group(1))
    element = re.search(r'\belement="([^"]*)"', error.group(1))
    fault_type = re.search(r'<(?:\w+:)?Fault\b[^>]*\btype="([^"]*)"', text)
    return IntuitFault(
        message=_xml_text("Message", text),
        detail=_xml_text("Detail", text),
        code=code.group(1) if code and code.group(1) else None,
        element=element.group(1) if element and element.group(1) else None,
        fault_type=fault_type.group(1) if fault_type else None,
    )


def _html_fault(text: str) -> IntuitFault:
    title = _xml_text("title", text) or _xml_text("h1", text)
    plain = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", title or text)).strip()
    # NOTE: a gateway page may carry the throttle in its text only.
    code = THROTTLE_CODE if re.search(r"ThrottleExceeded|errorCode=003001", text) else None
    return IntuitFault(_shorten(html.unescape(plain)) or "an HTML page", code=code)


def _shorten(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def scrub_tokens(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without the given secrets nor anything shaped like a bearer or refresh token."""
    text = scrub_secrets(text, secrets)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub("***", text)
    return text


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    for key, value in (headers or {}).items():
        if key.lower() == name.lower():
            return str(value)
    return None


def classify_quickbooks_error(error: Exception, secrets: Iterable[str] = ()) -> DeliveryError:
    """Map what a QuickBooks call raised to a transient or terminal :class:`DeliveryError`.

    401 is a refusable access token (refresh, retry once); 429, fault 3001 (in JSON, XML or
    HTML) and 5xx are transient, waiting 60 s unless ``Retry-After`` says otherwise; fault codes
    610, 2000-4999, 5000-5999 and 6000-6999 are terminal; then the common HTTP rules. The
    message is Intuit's (``Message: Detail``), the request id its ``intuit_tid``.

    Args:
        error: What the SDK, intuit-oauth or requests raised.
        secrets: Values to scrub from the message (tokens the adapter used).
    """
    if isinstance(error, DeliveryError):
        return error
    classified = _classify(error)
    classified.message = scrub_tokens(classified.message, secrets)
    classified.args = (str(classified),)
    return classified


def _classify(error: Exception) -> DeliveryError:
    try:
        load_sdks()
        import requests
        from intuitlib.exceptions import AuthClientError  # type: ignore[import-untyped]
        from quickbooks.exceptions import AuthorizationException, QuickbooksException  # type: ignore[import-untyped]
    except ImportError:  # pragma: no cover - without the SDKs only our own errors occur
        return _unknown(error)
    if isinstance(error, AuthClientError):
        return _classify_token_error(error)
    if isinstance(error, QuickbooksException):
        return _classify_api_error(error, isinstance(error, AuthorizationException))
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        return TransientError(f"no response from QuickBooks: {type(error).__name__}: {error}")
    if isinstance(error, requests.exceptions.ChunkedEncodingError):
        return TransientError(f"QuickBooks' response was cut off: {error}")
    return _unknown(error)


def _unknown(error: Exception) -> DeliveryError:
    message = f"{type(error).__name__}: {error}"
    return TransientError(message) if isinstance(error, OSError) else TerminalError(message)


def _classify_api_error(error: Any, authorization: bool) -> DeliveryError:
    response = getattr(error, "kiki_response", None)
    status: int | None = getattr(response, "status_code", None)
    headers: Mapping[str, str] = dict(getattr(response, "headers", None) or {})
    sdk_code = getattr(error, "error_code", None)
    if status is None:
        # NOTE: python-quickbooks raises AuthorizationException(error_code=401) for HTTP 401,
        # and names the status in a 10000's message ("Error returned with status code '429'").
        found = _SDK_STATUS.search(str(getattr(error, "message", "")))
        if found:
            status = int(found.group(1))
        elif authorization and sdk_code == 401:
            status = 401
    body = getattr(response, "text", None) if response is not None else None
    fault = parse_fault(body) if body else None
    if fault is None or not (fault.message or fault.detail):
        # NOTE: a 10000 from the SDK means a non-JSON body or JSON without Fault; the raw body
        # is then all its message holds.
        raw = str(getattr(error, "message", "") or "")
        detail = str(getattr(error, "detail", "") or "")
        start = re.search(r"[{<]", raw) if sdk_code == 10000 else None
        parsed = parse_fault(raw[start.start() :]) if start else None
        if parsed is None and detail.lstrip().startswith(("{", "<")):
            parsed = parse_fault(detail)  # a 401's body is its detail
        code = str(sdk_code) if sdk_code not in (None, "", 10000) else None
        fault = parsed or IntuitFault(_shorten(raw), _shorten(detail), code)
    request_id = _header(headers, "intuit_tid")
    code = fault.code
    message = fault.text or f"QuickBooks answered HTTP {status}"
    details: dict[str, Any] = {"request_id": request_id, "status": status, "code": code}
    retry_after = parse_retry_after(_header(headers, "Retry-After"))

    if status == 401:
        return CredentialsExpired(f"QuickBooks refused the access token: {message}", **details)
    if status == 429 or fault.throttled:
        wait = retry_after if retry_after is not None else THROTTLE_WAIT
        return RateLimitedError(message, retry_after=wait, **details)
    if status is not None and status >= 500:
        wait = retry_after if retry_after is not None else THROTTLE_WAIT
        return TransientError(message, retry_after=wait, **details)
    if status in (408, 409, 425):  # a timeout, or the same requestid still in progress
        return TransientError(message, retry_after=retry_after, **details)
    number = int(code) if code and code.isdigit() else None
    # NOTE: Intuit's error-code ranges (developer.intuit.com "Error codes"): 610 object not
    # found; 2000-4999 validation (2050 string length, 2500 invalid reference); 5000-5999
    # (5010 stale object); 6000-6999 business rules (6240 duplicate name, 6070 amount,
    # 6140 duplicate DocNumber). None of them changes on a retry.
    if number is not None and (number == 610 or 2000 <= number <= 6999):
        return TerminalError(message, **details)
    if status is None:
        return TerminalError(message, **details)
    return classify_http_status(status, message, headers=headers, request_id=request_id, code=code)


def _classify_token_error(error: Any) -> DeliveryError:
    status = int(error.status_code)
    headers: Mapping[str, str] = dict(getattr(error, "headers", None) or {})
    request_id = error.intuit_tid or _header(headers, "intuit_tid")
    fault = parse_fault(getattr(error, "content", None))
    reason = fault.message if fault else f"HTTP {status}"
    code = fault.code if fault and fault.code else None
    details: dict[str, Any] = {"request_id": request_id, "status": status, "code": code}
    if reason == "invalid_grant":
        return TerminalError(
            "QuickBooks refused the refresh token (invalid_grant: revoked, unused for 100 days, "
            "or already used): connect again (`kiki-billing connect quickbooks`) or set a new "
            "KIKI_QUICKBOOKS_REFRESH_TOKEN",
            **details,
        )
    if reason == "invalid_client" or status == 401:
        return TerminalError(
            "QuickBooks refused the app's credentials (KIKI_QUICKBOOKS_CLIENT_ID / "
            f"KIKI_QUICKBOOKS_CLIENT_SECRET): {reason}",
            **details,
        )
    message = f"QuickBooks token endpoint: {reason}"
    return classify_http_status(status, message, headers=headers, request_id=request_id, code=code)
