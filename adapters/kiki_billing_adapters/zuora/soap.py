"""Zuora's SOAP API through zeep: the WSDL parsed once per process, envelopes built without I/O.

The adapter builds each step's envelope here with the session masked (what ``--dry-run``
shows and what the step hands to ``send``), puts the session in just before posting, and
hands the answer back to zeep to parse. ``zeep`` and ``lxml`` are imported only when a WSDL is
loaded, so ``kiki-billing`` works without them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kiki_billing.plugin import ConfigurationError, TransientError, parse_retry_after

from .errors import ZuoraApiError, fault_code

if TYPE_CHECKING:
    import requests

API_NS = "http://api.zuora.com/"
OBJECT_NS = "http://object.api.zuora.com/"
BINDING = "{http://api.zuora.com/}SoapBinding"
DEFAULT_WSDL = Path(__file__).with_name("zuora.a.78.0.wsdl")
"""The public Zuora WSDL 78.0 (see PROVENANCE.md next to it)."""
SESSION_MASK = "***"
"""Stands for the session id in every envelope a step builds; replaced just before posting."""
OPERATIONS = ("login", "query", "create", "update", "subscribe")
# Every field the adapter sends or reads: a tenant's WSDL lacking one is refused at start-up
# with the field named, instead of failing later in the middle of a delivery.
FIELDS: Mapping[str, Sequence[str]] = {
    f"{{{OBJECT_NS}}}Account": (
        "AccountNumber",
        "Batch",
        "BillCycleDay",
        "BillToId",
        "Currency",
        "Name",
        "Notes",
        "PaymentTerm",
        "SoldToId",
        "Status",
    ),
    f"{{{OBJECT_NS}}}Contact": ("AccountId", "FirstName", "LastName", "WorkEmail"),
    f"{{{OBJECT_NS}}}Subscription": (
        "AccountId",
        "AutoRenew",
        "ContractAcceptanceDate",
        "ContractEffectiveDate",
        "InitialTerm",
        "InitialTermPeriodType",
        "IsInvoiceSeparate",
        "Name",
        "Notes",
        "RenewalTerm",
        "RenewalTermPeriodType",
        "ServiceActivationDate",
        "Status",
        "TermType",
    ),
    f"{{{OBJECT_NS}}}RatePlan": ("ProductRatePlanId",),
    f"{{{OBJECT_NS}}}RatePlanCharge": ("Description", "Price", "ProductRatePlanChargeId"),
    f"{{{OBJECT_NS}}}Invoice": (
        "AccountId",
        "Amount",
        "Balance",
        "DueDate",
        "InvoiceNumber",
        "PaymentAmount",
        "RefundAmount",
        "Status",
    ),
    f"{{{OBJECT_NS}}}InvoiceItem": ("ChargeAmount", "InvoiceId", "SubscriptionId"),
    f"{{{OBJECT_NS}}}InvoiceItemAdjustment": (
        "AdjustmentDate",
        "Amount",
        "Comment",
        "InvoiceId",
        "ReferenceId",
        "SourceId",
        "SourceType",
        "Status",
        "Type",
    ),
    f"{{{API_NS}}}SubscribeRequest": ("Account", "SubscribeOptions", "SubscriptionData"),
    f"{{{API_NS}}}SubscribeOptions": (
        "GenerateInvoice",
        "ProcessPayments",
        "SubscribeInvoiceProcessingOptions",
    ),
    f"{{{API_NS}}}SubscribeInvoiceProcessingOptions": (
        "InvoiceDate",
        "InvoiceProcessingScope",
        "InvoiceTargetDate",
    ),
    f"{{{API_NS}}}SubscriptionData": ("RatePlanData", "Subscription"),
    f"{{{API_NS}}}RatePlanData": ("RatePlan", "RatePlanChargeData"),
    f"{{{API_NS}}}RatePlanChargeData": ("RatePlanCharge",),
}
# Which element of a subscribe request is built from which WSDL type (zObjects from the
# object namespace, the request's own structure from the API namespace).
_SUBSCRIBE_TYPES: Mapping[str, tuple[str, str]] = {
    "Account": (OBJECT_NS, "Account"),
    "SubscribeOptions": (API_NS, "SubscribeOptions"),
    "SubscribeInvoiceProcessingOptions": (API_NS, "SubscribeInvoiceProcessingOptions"),
    "SubscriptionData": (API_NS, "SubscriptionData"),
    "Subscription": (OBJECT_NS, "Subscription"),
    "RatePlanData": (API_NS, "RatePlanData"),
    "RatePlan": (OBJECT_NS, "RatePlan"),
    "RatePlanChargeData": (API_NS, "RatePlanChargeData"),
    "RatePlanCharge": (OBJECT_NS, "RatePlanCharge"),
}
# NOTE: a generous read timeout: subscribe() also generates (and may collect) the invoice.
# A call that outlives it is retried; the unique subscription name makes the retry safe.
TIMEOUT = (10.0, 120.0)
REQUEST_ID_HEADER = "Zuora-Request-Id"

_CACHE: dict[Path, ZuoraWsdl] = {}
_CACHE_LOCK = threading.Lock()


@dataclass(frozen=True)
class Envelope:
    """A SOAP request as sent: the operation, the HTTP headers and the XML (session masked)."""

    operation: str
    xml: str
    headers: Mapping[str, str]


class ZuoraWsdl:
    """One parsed Zuora WSDL: builds envelopes and parses answers; thread-safe, no I/O.

    Use :meth:`load`, which parses each file once per process.
    """

    def __init__(self, path: Path, client: Any) -> None:
        self.path = path
        self.client: Any = client
        self.binding: Any = client.wsdl.bindings[BINDING]
        self.address: str | None = _soap_address(client)
        """The WSDL's ``soap:address`` (the default endpoint)."""
        self.objects: Any = client.type_factory(OBJECT_NS)
        self._service = client.create_service(BINDING, self.address or "https://localhost/")
        self._session_header: Any = client.get_element(f"{{{API_NS}}}SessionHeader")
        self._call_options: Any = client.get_element(f"{{{API_NS}}}CallOptions")

    @classmethod
    def load(cls, path: str | Path | None = None) -> ZuoraWsdl:
        """The WSDL at ``path`` (default: the one shipped), parsed on first use only.

        Raises:
            ConfigurationError: The file cannot be read, is not a WSDL, imports documents
                over the network, or lacks Zuora's binding, an operation or a field the
                adapter uses.
        """
        where = Path(path).expanduser() if path is not None else DEFAULT_WSDL
        try:
            key = where.resolve(strict=True)
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _wsdl_error(where, f"cannot be read ({reason})") from None
        with _CACHE_LOCK:
            found = _CACHE.get(key)
            if found is None:
                client = _parse(key)
                if BINDING not in client.wsdl.bindings:
                    raise _wsdl_error(key, f"is not a Zuora WSDL (no binding {BINDING})")
                found = cls(key, client)
                found._check()
                _CACHE[key] = found
            return found

    def _check(self) -> None:
        operations = self.binding._operations
        missing = [name for name in OPERATIONS if name not in operations]
        if missing:
            raise _wsdl_error(self.path, f"has no {', '.join(missing)} operation")
        for qname, fields in FIELDS.items():
            try:
                known = {name for name, _ in self.client.get_type(qname).elements}
            except Exception:
                raise _wsdl_error(self.path, f"has no type {qname}") from None
            absent = [name for name in fields if name not in known]
            if absent:
                raise _wsdl_error(self.path, f"{qname} has no field {absent[0]}")
        for name in ("SessionHeader", "CallOptions"):
            try:
                self.client.get_element(f"{{{API_NS}}}{name}")
            except Exception:
                raise _wsdl_error(self.path, f"has no {name} header") from None

    # Envelopes ---------------------------------------------------------------------------

    def _envelope(
        self, operation: str, headers: Sequence[Any], body: Mapping[str, Any]
    ) -> Envelope:
        message = self.client.create_message(
            self._service, operation, _soapheaders=list(headers), **body
        )
        soap_action = self.binding.get(operation).soapaction
        http_headers = {
            "Content-Type": "text/xml; charset=utf-8",
            "SOAPAction": f'"{soap_action}"' if soap_action else '""',
        }
        return Envelope(operation, _to_bytes(message).decode("utf-8"), http_headers)

    def _masked_session(self) -> Any:
        return self._session_header(session=SESSION_MASK)

    def create(self, type_name: str, fields: Mapping[str, Any]) -> Envelope:
        """``create()`` of one zObject (``zeep`` adds its ``xsi:type``)."""
        zobject = getattr(self.objects, type_name)(**fields)
        return self._envelope("create", [self._masked_session()], {"zObjects": [zobject]})

    def update(self, type_name: str, fields: Mapping[str, Any]) -> Envelope:
        """``update()`` of one zObject (its ``Id`` and the fields to change)."""
        zobject = getattr(self.objects, type_name)(**fields)
        return self._envelope("update", [self._masked_session()], {"zObjects": [zobject]})

    def subscribe(self, request: Mapping[str, Any], *, single_transaction: bool) -> Envelope:
        """``subscribe()`` of one SubscribeRequest given as nested mappings and lists."""
        built = self._typed(self.client.get_type(f"{{{API_NS}}}SubscribeRequest"), request)
        # NOTE: the WSDL declares CallOptions only on create(), so zeep's header dict refuses
        # it on subscribe(); passed as an element it goes out as is (PROVIDERS.md).
        headers = [
            self._masked_session(),
            self._call_options(useSingleTransaction=single_transaction),
        ]
        return self._envelope("subscribe", headers, {"subscribes": [built]})

    def query(self, zoql: str) -> Envelope:
        """``query()`` with a ZOQL statement."""
        return self._envelope("query", [self._masked_session()], {"queryString": zoql})

    def login(self, username: str, password: str) -> bytes:
        """The ``login()`` envelope, credentials included: posted at once, never kept."""
        message = self.client.create_message(
            self._service, "login", username=username, password=password
        )
        return _to_bytes(message)

    def _typed(self, kind: Any, value: Mapping[str, Any]) -> Any:
        fields: dict[str, Any] = {}
        for name, item in value.items():
            target = _SUBSCRIBE_TYPES.get(name)
            if target is None:
                fields[name] = item
                continue
            child = self.client.get_type(f"{{{target[0]}}}{target[1]}")
            if isinstance(item, list):
                fields[name] = [self._typed(child, each) for each in item]
            else:
                fields[name] = self._typed(child, item)
        return kind(**fields)

    # Sending -----------------------------------------------------------------------------

    def post(
        self,
        transport: Any,
        address: str,
        envelope: Envelope,
        *,
        session: str | None,
    ) -> Any:
        """Post ``envelope`` (with ``session`` put in) to ``address``; return zeep's result.

        Raises:
            ZuoraApiError: A SOAP fault, or an HTTP error without a SOAP body.
            TransientError: A 2xx answer that is not a readable SOAP envelope.
            requests.RequestException: No answer (connection reset, timeout).
        """
        body = (
            envelope.xml.encode("utf-8") if session is None else with_session(envelope.xml, session)
        )
        return self.send(transport, address, envelope.operation, body, envelope.headers)

    def post_login(
        self, transport: Any, address: str, username: str, password: str
    ) -> tuple[str, str | None]:
        """``login()``: the session id and the ``ServerUrl`` Zuora answered."""
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
        result = self.send(transport, address, "login", self.login(username, password), headers)
        session = getattr(result, "Session", None)
        if not session:
            raise ZuoraApiError("login answered without a session", operation="login")
        server_url = getattr(result, "ServerUrl", None)
        return str(session), str(server_url) if server_url else None

    def send(
        self,
        transport: Any,
        address: str,
        operation: str,
        body: bytes,
        headers: Mapping[str, str],
    ) -> Any:
        """Post a ready envelope and parse the answer with zeep."""
        exceptions = _import("zeep.exceptions")
        Fault, TransportError = exceptions.Fault, exceptions.TransportError
        response: requests.Response = transport.post(address, body, dict(headers))
        request_id = response.headers.get(REQUEST_ID_HEADER)
        retry_after = parse_retry_after(response.headers.get("Retry-After"))
        try:
            return self.binding.process_reply(self.client, self.binding.get(operation), response)
        except Fault as fault:
            code = fault_code(fault.code) or _detail_code(fault)
            if code is None:  # zeep's "Unknown fault" for an answer that is no SOAP fault
                raise ZuoraApiError(
                    f"HTTP {response.status_code} without a SOAP fault",
                    operation=operation,
                    status=response.status_code,
                    request_id=request_id,
                    retry_after=retry_after,
                ) from None
            raise ZuoraApiError(
                _fault_message(fault),
                operation=operation,
                code=code,
                status=response.status_code,
                request_id=request_id,
                retry_after=retry_after,
            ) from None
        except TransportError as exc:
            if 200 <= response.status_code < 300:
                raise TransientError(
                    f"Zuora {operation}: HTTP {response.status_code} with an answer that is not "
                    "a SOAP envelope",
                    request_id=request_id,
                    status=response.status_code,
                ) from None
            raise ZuoraApiError(
                f"HTTP {exc.status_code or response.status_code} without a SOAP answer",
                operation=operation,
                status=response.status_code,
                request_id=request_id,
                retry_after=retry_after,
            ) from None


def with_session(envelope: str, session: str) -> bytes:
    """``envelope`` as bytes with :data:`SESSION_MASK` replaced by the session id.

    The XML is parsed and serialized the way zeep serializes it, so every byte but the
    session's is the step's request as built.
    """
    etree = _import("lxml.etree")
    root = etree.fromstring(envelope.encode("utf-8"))
    found = root.findall(f".//{{{API_NS}}}SessionHeader/{{{API_NS}}}session")
    if len(found) != 1 or found[0].text != SESSION_MASK:
        raise ValueError("the envelope has no masked session header")
    found[0].text = session
    return _to_bytes(root)


def make_transport() -> Any:
    """A zeep requests transport with timeouts, a connection pool and no body logging."""
    import requests
    from requests.adapters import HTTPAdapter

    base: Any = _import("zeep.transports").Transport

    class QuietTransport(base):  # type: ignore[misc]
        """Zeep's transport without its DEBUG log of every body.

        The login body carries the password, every other body the session id.
        """

        def post(self, address: str, message: bytes, headers: dict[str, str]) -> Any:
            return self.session.post(
                address, data=message, headers=headers, timeout=self.operation_timeout
            )

    session = requests.Session()
    pooled = HTTPAdapter(pool_connections=4, pool_maxsize=64, max_retries=0)
    session.mount("https://", pooled)
    session.mount("http://", pooled)
    return QuietTransport(session=session, operation_timeout=TIMEOUT)


def endpoint_path(address: str) -> str:
    """The path of a SOAP endpoint URL (what a step's request shows)."""
    return urlsplit(address).path or "/"


def _parse(path: Path) -> Any:
    """Parse the WSDL file offline: a document it imports over the network is refused."""
    zeep = _import("zeep")
    _import("zeep.exceptions")
    base: Any = zeep.Transport

    class OfflineLoader(base):  # type: ignore[misc]
        def load(self, url: str) -> bytes:
            if urlsplit(url).scheme in ("http", "https", "ftp"):
                raise ConfigurationError(_remote_refused(path, url))
            data: bytes = super().load(url)
            return data

        def post(self, address: str, message: bytes, headers: dict[str, str]) -> Any:
            raise RuntimeError("the WSDL loader does not send requests")

    try:
        return zeep.Client(
            str(path),
            transport=OfflineLoader(),
            settings=zeep.Settings(forbid_dtd=True, forbid_entities=True, forbid_external=True),
        )
    except ConfigurationError:
        raise
    except zeep.exceptions.ExternalReferenceForbidden as exc:
        raise ConfigurationError(_remote_refused(path, exc.url)) from None
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise _wsdl_error(path, f"is not a WSDL zeep can read ({reason[:200]})") from None


def _soap_address(client: Any) -> str | None:
    for service in client.wsdl.services.values():
        for port in service.ports.values():
            if port.binding.name.text == BINDING:
                address = (port.binding_options or {}).get("address")
                return str(address) if address else None
    return None


def _remote_refused(path: Path, url: str) -> str:
    return (
        f"KIKI_ZUORA_WSDL: {path} imports {url}; kiki-billing never fetches WSDL parts over "
        "the network (save them next to the WSDL and refer to the files)"
    )


def _wsdl_error(path: Path, reason: str) -> ConfigurationError:
    if path == DEFAULT_WSDL:
        return ConfigurationError(f"the WSDL shipped with kiki-billing ({path}) {reason}")
    return ConfigurationError(f"KIKI_ZUORA_WSDL: {path} {reason}")


def _fault_message(fault: Any) -> str:
    message = str(getattr(fault, "message", "") or "").strip()
    return message or _detail_text(fault, "FaultMessage") or "SOAP fault without a message"


def _detail_code(fault: Any) -> str | None:
    return _detail_text(fault, "FaultCode")


def _detail_text(fault: Any, name: str) -> str | None:
    """A field of Zuora's typed fault detail (``fns:FaultCode``, ``fns:FaultMessage``)."""
    detail = getattr(fault, "detail", None)
    if detail is None or not hasattr(detail, "iter"):  # zeep's detail is bytes without a Fault
        return None
    for node in detail.iter():
        if str(node.tag).endswith(name) and node.text:
            return str(node.text).strip()
    return None


def _import(module: str) -> Any:
    """A module of zeep or lxml, imported on first use (typed loosely: zeep is not typed)."""
    return importlib.import_module(module)


def _to_bytes(element: Any) -> bytes:
    """An element serialized as zeep serializes envelopes (UTF-8, XML declaration)."""
    data: bytes = _import("zeep.wsdl.utils").etree_to_string(element)
    return data
