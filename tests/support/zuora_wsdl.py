"""The XML schemas embedded in Zuora's WSDLs, for checking SOAP envelopes (lxml, offline).

A Zuora WSDL carries three schemas (the object, API and fault namespaces) that import one
another. :class:`ZuoraSchema` compiles them into one :class:`lxml.etree.XMLSchema` and checks an
envelope the way a strict SOAP server would: the SOAP 1.1 frame (one ``Header`` at most, then
one ``Body``), every header block and the body's element against the schema (types, patterns,
sequence order, ``xsi:type`` of zObjects), and for a fault its ``faultcode``, ``faultstring``
and ``detail``. zeep checks structure but not simple-type values, so this is what catches an
``ID`` that is not 32 alphanumerics or a decimal with a comma.

It also reads the field order of each complex type, which the fake uses to answer in the
WSDL's sequence order.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

SPECS = Path(__file__).resolve().parent.parent / "specs" / "zuora"
WSDL_78 = SPECS / "zuora.a.78.0.wsdl"
WSDL_82 = SPECS / "zuora.a.82.0.sandbox.wsdl"
WSDLS = (WSDL_78, WSDL_82)

XSD = "http://www.w3.org/2001/XMLSchema"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
SOAP_BINDING_NS = "http://schemas.xmlsoap.org/wsdl/soap/"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
API_NS = "http://api.zuora.com/"
OBJECT_NS = "http://object.api.zuora.com/"
FAULT_NS = "http://fault.api.zuora.com/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
HEADER_ELEMENTS = frozenset({"SessionHeader", "CallOptions", "QueryOptions"})


@dataclass(frozen=True)
class Field:
    """One element of a complex type's sequence."""

    name: str
    type: str
    """The local name of its type (``string``, ``decimal``, ``ID``, ``Account``, ...)."""
    type_ns: str
    """The namespace of its type (XML Schema's for ``string``)."""
    many: bool


class EnvelopeProblem(ValueError):
    """An envelope the WSDL's schema (or SOAP 1.1) does not allow."""


class ZuoraSchema:
    """The schemas of one WSDL file, compiled; thread-safe for validation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.document = etree.parse(str(path), etree.XMLParser(resolve_entities=False))
        self._schemas = {
            node.get("targetNamespace"): node for node in self.document.iter(f"{{{XSD}}}schema")
        }
        self.schema = _compile(list(self._schemas.values()))
        self._lock = threading.Lock()  # one validation at a time: the error log is shared
        self.address = _address(self.document)
        self.version = self.address.rstrip("/").rsplit("/", 1)[-1]
        self.operations = frozenset(
            op.get("name")
            for op in self.document.iterfind(f"{{{WSDL_NS}}}portType/{{{WSDL_NS}}}operation")
        )

    # Types ------------------------------------------------------------------------------

    @functools.cache  # noqa: B019 - one schema per file, kept for the process
    def fields(self, namespace: str, type_name: str) -> tuple[Field, ...]:
        """The sequence of a complex type, base types first."""
        node = self._complex_type(namespace, type_name)
        if node is None:
            raise KeyError(f"{{{namespace}}}{type_name}")
        found: list[Field] = []
        extension = node.find(f"{{{XSD}}}complexContent/{{{XSD}}}extension")
        if extension is not None:
            base_ns, base = _qname(extension, extension.get("base"))
            found.extend(self.fields(base_ns, base))
            sequence = extension.find(f"{{{XSD}}}sequence")
        else:
            sequence = node.find(f"{{{XSD}}}sequence")
        for element in sequence.iterfind(f"{{{XSD}}}element") if sequence is not None else ():
            kind_ns, kind = _qname(element, element.get("type") or "xs:string")
            many = element.get("maxOccurs") not in (None, "1")
            found.append(Field(element.get("name"), kind, kind_ns, many))
        return tuple(found)

    def object_fields(self, type_name: str) -> tuple[Field, ...]:
        """The fields of a zObject type (``Account``), ``fieldsToNull`` and ``Id`` first."""
        return self.fields(OBJECT_NS, type_name)

    def has_object(self, type_name: str) -> bool:
        """Whether the WSDL defines the zObject type."""
        return self.is_complex(OBJECT_NS, type_name)

    def is_complex(self, namespace: str, type_name: str) -> bool:
        """Whether ``{namespace}type_name`` is a complex type of the WSDL."""
        return self._complex_type(namespace, type_name) is not None

    def _complex_type(self, namespace: str, type_name: str) -> Any:
        schema = self._schemas.get(namespace)
        if schema is None:
            return None
        for node in schema.iterfind(f"{{{XSD}}}complexType"):
            if node.get("name") == type_name:
                return node
        return None

    # Validation -------------------------------------------------------------------------

    def problems(self, element: Any) -> list[str]:
        """Why ``element`` (a global element of the WSDL, in place) is invalid; [] if valid."""
        with self._lock:
            if self.schema.validate(element):
                return []
            return [f"{e.message} (line {e.line})" for e in self.schema.error_log]

    def check_envelope(self, data: bytes, *, response: bool = False) -> Any:
        """Parse ``data`` and check it; return the root element.

        Raises:
            EnvelopeProblem: Not XML, not a SOAP 1.1 envelope, or a part the schema rejects.
        """
        try:
            root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError as exc:
            raise EnvelopeProblem(f"not XML: {exc}") from None
        if root.tag != f"{{{SOAP_ENV}}}Envelope":
            raise EnvelopeProblem(f"the root is {root.tag}, not a SOAP 1.1 Envelope")
        children = list(_elements(root))
        names = [etree.QName(c).localname for c in children]
        if names not in (["Body"], ["Header", "Body"]) or any(
            etree.QName(c).namespace != SOAP_ENV for c in children
        ):
            raise EnvelopeProblem(f"an Envelope holds an optional Header and a Body, not {names}")
        if names[0] == "Header":
            for block in _elements(children[0]):
                name = etree.QName(block)
                if name.namespace != API_NS or name.localname not in HEADER_ELEMENTS:
                    raise EnvelopeProblem(f"unknown header block {block.tag}")
                self._raise_problems(block)
        body = list(_elements(children[-1]))
        if len(body) != 1:
            raise EnvelopeProblem(f"the Body holds {len(body)} elements, not one")
        payload = body[0]
        if payload.tag == f"{{{SOAP_ENV}}}Fault":
            if not response:
                raise EnvelopeProblem("a request cannot be a Fault")
            self._check_fault(payload)
            return root
        name = etree.QName(payload)
        operation = name.localname.removesuffix("Response") if response else name.localname
        if name.namespace != API_NS or operation not in self.operations:
            raise EnvelopeProblem(f"{payload.tag} is not an operation of this WSDL")
        if response != name.localname.endswith("Response"):
            raise EnvelopeProblem(f"{payload.tag} in a {'response' if response else 'request'}")
        self._raise_problems(payload)
        return root

    def _check_fault(self, fault: Any) -> None:
        parts = [etree.QName(c).localname for c in _elements(fault)]
        if parts[:2] != ["faultcode", "faultstring"] or not set(parts) <= {
            "faultcode",
            "faultstring",
            "faultactor",
            "detail",
        }:
            raise EnvelopeProblem(f"a SOAP 1.1 Fault holds faultcode, faultstring, not {parts}")
        code = fault.find("faultcode").text or ""
        prefix, _, local = code.partition(":")
        if not local or fault.find("faultcode").nsmap.get(prefix) is None:
            raise EnvelopeProblem(f"faultcode {code!r} is not a QName in scope")
        detail = fault.find("detail")
        for block in _elements(detail) if detail is not None else ():
            if etree.QName(block).namespace != FAULT_NS:
                raise EnvelopeProblem(f"unknown fault detail {block.tag}")
            self._raise_problems(block)

    def _raise_problems(self, element: Any) -> None:
        found = self.problems(element)
        if found:
            raise EnvelopeProblem(f"{etree.QName(element).localname}: {found[0]}")


@functools.cache
def schema_for(path: str | Path) -> ZuoraSchema:
    """The compiled schemas of a WSDL file (once per process)."""
    return ZuoraSchema(Path(path).resolve())


def _elements(node: Any) -> Iterator[Any]:
    return (child for child in node if isinstance(child.tag, str))


def _qname(node: Any, value: str) -> tuple[str, str]:
    prefix, _, local = value.rpartition(":")
    return node.nsmap.get(prefix or None, ""), local


def _address(document: Any) -> str:
    for port in document.iterfind(f"{{{WSDL_NS}}}service/{{{WSDL_NS}}}port"):
        address = port.find(f"{{{SOAP_BINDING_NS}}}address")
        if address is not None:
            return str(address.get("location"))
    raise ValueError("the WSDL has no soap:address")


def _compile(schemas: list[Any]) -> Any:
    """One XMLSchema from the WSDL's schemas, which import each other by namespace only."""
    documents: dict[str, bytes] = {}
    for node in schemas:
        copied = etree.Element(node.tag, attrib=dict(node.attrib), nsmap=dict(node.nsmap))
        for child in node:
            copied.append(copy.deepcopy(child))
        for imported in copied.iterfind(f"{{{XSD}}}import"):
            imported.set("schemaLocation", "mem:" + imported.get("namespace"))
        documents["mem:" + node.get("targetNamespace")] = etree.tostring(copied)

    class InMemory(etree.Resolver):
        def resolve(self, url: str, pubid: Any, context: Any) -> Any:
            if url in documents:
                return self.resolve_string(documents[url], context)
            raise EnvelopeProblem(f"the WSDL's schemas refer to {url}, which is not in the file")

    parser = etree.XMLParser(no_network=True)
    parser.resolvers.add(InMemory())
    imports = "".join(
        f'<xs:import namespace="{ns[4:]}" schemaLocation="{ns}"/>' for ns in documents
    )
    wrapper = f'<xs:schema xmlns:xs="{XSD}" targetNamespace="urn:kiki:zuora">{imports}</xs:schema>'
    return etree.XMLSchema(etree.fromstring(wrapper.encode(), parser))
