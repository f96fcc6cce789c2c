"""Intuit's v3 XSD as a validator of QuickBooks Online JSON (for the tests and the fake).

QBO's JSON is its XML under the same names. In an object, a key is a child element, an
attribute of the element's type (``domain``, ``sparse``, a reference's ``name``/``type``, a
fault's ``type``, the response's ``time``), or ``value``, the text of a simple-content type
(``{"value": "1", "name": "Sales"}`` is ``<ItemRef name="Sales">1</ItemRef>``); a list repeats
the element. This module reads the XSD (``tests/specs/quickbooks/``) for the kind and order of
every name, builds the XML a JSON document stands for, and has lxml validate that against the
schema itself, so an unknown element, a wrong type, a bad enumeration value or a missing required
element is reported as the XSD reports it. JSON types are checked too: a number where the XSD
says string, or a string where it says decimal, is an error even though XML would not tell.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from lxml import etree

SPECS = Path(__file__).resolve().parents[1] / "specs" / "quickbooks"
ROOT_XSD = SPECS / "IntuitRestServiceDef.xsd"
NS = "http://schema.intuit.com/finance/v3"
XS = "{http://www.w3.org/2001/XMLSchema}"

_NUMERIC = {
    "decimal", "integer", "int", "long", "short", "byte", "double", "float",
    "positiveInteger", "nonNegativeInteger", "negativeInteger", "nonPositiveInteger",
    "unsignedInt", "unsignedLong", "unsignedShort", "unsignedByte",
}  # fmt: skip


class SchemaError(ValueError):
    """A JSON document the XSD refuses; ``errors`` lists every problem found."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


@dataclass
class ComplexType:
    """What a JSON object of this type may hold."""

    name: str
    children: dict[str, str | None] = field(default_factory=dict)
    """Child element name -> its type (None: anonymous/any), in document order."""
    attributes: dict[str, str] = field(default_factory=dict)
    simple_content: str | None = None
    """The base type of the text, for a simple-content type."""
    base: str | None = None
    any_children: bool = False


def _local(qname: str | None) -> str | None:
    return qname.split(":", 1)[1] if qname and ":" in qname else qname


class QuickBooksSchema:
    """The XSD's types (for mapping) and the compiled schema (for validating)."""

    def __init__(self, root: Path = ROOT_XSD) -> None:
        self.xsd = etree.XMLSchema(etree.parse(str(root)))
        self._types: dict[str, etree._Element] = {}
        self._simple: dict[str, etree._Element] = {}
        self._groups: dict[str, etree._Element] = {}
        self.elements: dict[str, str | None] = {}
        self.substitutes: dict[str, list[str]] = {}
        self._abstract: set[str] = set()
        self._resolved: dict[str, ComplexType] = {}
        self._load(root, set())

    # Reading the XSD ------------------------------------------------------------------------

    def _load(self, path: Path, seen: set[Path]) -> None:
        if path in seen:
            return
        seen.add(path)
        document = etree.parse(str(path)).getroot()
        for node in document:
            if not isinstance(node.tag, str):
                continue
            tag, name = node.tag, node.get("name")
            if tag == XS + "include":
                self._load(path.parent / node.get("schemaLocation", ""), seen)
            elif tag == XS + "complexType" and name:
                self._types[name] = node
            elif tag == XS + "simpleType" and name:
                self._simple[name] = node
            elif tag == XS + "group" and name:
                self._groups[name] = node
            elif tag == XS + "element" and name:
                self.elements[name] = _local(node.get("type"))
                if node.get("abstract") == "true":
                    self._abstract.add(name)
                head = _local(node.get("substitutionGroup"))
                if head:
                    self.substitutes.setdefault(head, []).append(name)

    def complex_type(self, name: str) -> ComplexType | None:
        """The resolved complex type ``name`` (with what it inherits), or None."""
        if name in self._resolved:
            return self._resolved[name]
        node = self._types.get(name)
        if node is None:
            return None
        resolved = self._resolved[name] = ComplexType(name)
        self._read_complex(node, resolved)
        return resolved

    def _read_complex(self, node: etree._Element, into: ComplexType) -> None:
        for child in node:
            if not isinstance(child.tag, str):
                continue
            if child.tag in (XS + "complexContent", XS + "simpleContent"):
                for derivation in child:
                    if not isinstance(derivation.tag, str):
                        continue
                    base = _local(derivation.get("base"))
                    into.base = base
                    inherited = self.complex_type(base) if base else None
                    if inherited is not None:
                        into.children.update(inherited.children)
                        into.attributes.update(inherited.attributes)
                        into.simple_content = inherited.simple_content
                        into.any_children |= inherited.any_children
                    elif child.tag == XS + "simpleContent":
                        into.simple_content = base
                    self._read_complex(derivation, into)
            elif child.tag in (XS + "sequence", XS + "choice", XS + "all", XS + "group"):
                for name, type_name in self._particles(child):
                    if name == "##any":
                        into.any_children = True
                    else:
                        into.children.setdefault(name, type_name)
            elif child.tag == XS + "attribute":
                name = child.get("name") or _local(child.get("ref")) or ""
                into.attributes[name] = _local(child.get("type")) or "string"

    def _particles(self, node: etree._Element) -> Iterator[tuple[str, str | None]]:
        if node.tag == XS + "group" and node.get("ref"):
            group = self._groups[_local(node.get("ref")) or ""]
            for child in group:
                if isinstance(child.tag, str):
                    yield from self._particles(child)
            return
        for child in node:
            if not isinstance(child.tag, str):
                continue
            if child.tag == XS + "element":
                ref = _local(child.get("ref"))
                if ref is None:
                    name = child.get("name") or ""
                    inline = child.find(XS + "complexType")
                    if inline is not None:
                        synthetic = f"{name}@{id(child)}"
                        self._types[synthetic] = inline
                        yield name, synthetic
                    else:
                        yield name, _local(child.get("type")) or "string"
                    continue
                if ref not in self._abstract:
                    yield ref, self.elements.get(ref)
                for member in self._members(ref):
                    yield member, self.elements.get(member)
            elif child.tag in (XS + "sequence", XS + "choice", XS + "all", XS + "group"):
                yield from self._particles(child)
            elif child.tag == XS + "any":
                yield "##any", None

    def _members(self, head: str) -> Iterator[str]:
        for member in self.substitutes.get(head, ()):
            yield member
            yield from self._members(member)

    def builtin(self, type_name: str | None) -> str:
        """The XML Schema built-in a simple type derives from (``string`` when unknown)."""
        seen = 0
        while type_name and type_name in self._simple and seen < 20:
            restriction = self._simple[type_name].find(XS + "restriction")
            if restriction is None:
                return "string"  # a union or a list
            type_name = _local(restriction.get("base"))
            seen += 1
        return type_name or "string"

    # JSON -> XML ----------------------------------------------------------------------------

    def to_xml(self, element: str, document: Mapping[str, Any]) -> etree._Element:
        """The XML that a JSON ``document`` of the global ``element`` stands for.

        Raises:
            SchemaError: A JSON type that contradicts the XSD (checked here, as XML cannot).
        """
        problems: list[str] = []
        root = etree.Element(f"{{{NS}}}{element}", nsmap={None: NS})
        self._fill(root, document, self.elements.get(element), element, problems)
        if problems:
            raise SchemaError(problems)
        return root

    def _fill(
        self,
        node: etree._Element,
        value: Any,
        type_name: str | None,
        where: str,
        problems: list[str],
    ) -> None:
        info = self.complex_type(type_name) if type_name else None
        if isinstance(value, Mapping):
            if info is None:
                problems.append(f"{where}: an object where the XSD has {type_name or 'text'}")
                return
            order = list(info.children)
            known = [k for k in value if k in info.children]
            known.sort(key=order.index)
            unknown = [k for k in value if k not in info.children]
            for key, item in value.items():
                if key in info.attributes:
                    node.set(
                        key, self._scalar(item, info.attributes[key], f"{where}@{key}", problems)
                    )
                elif key == "value" and info.simple_content is not None:
                    node.text = self._scalar(item, info.simple_content, where, problems)
            for key in known + unknown:
                if key in info.attributes or (key == "value" and info.simple_content):
                    continue
                if key in unknown and not info.any_children:
                    problems.append(f"{where}.{key}: the XSD has no such element in {info.name}")
                    continue
                items = value[key] if isinstance(value[key], list) else [value[key]]
                for item in items:
                    child = etree.SubElement(node, f"{{{NS}}}{key}")
                    self._fill(child, item, info.children.get(key), f"{where}.{key}", problems)
            return
        if info is not None and info.simple_content is None and info.children:
            problems.append(f"{where}: a {type(value).__name__} where the XSD has {type_name}")
            return
        base = info.simple_content if info is not None else type_name
        node.text = self._scalar(value, base, where, problems)

    def _scalar(self, value: Any, type_name: str | None, where: str, problems: list[str]) -> str:
        builtin = self.builtin(type_name)
        if value is None:
            problems.append(f"{where}: null")
            return ""
        if isinstance(value, bool):
            if builtin != "boolean":
                problems.append(f"{where}: a boolean where the XSD has {builtin}")
            return "true" if value else "false"
        if isinstance(value, int | float | Decimal):
            if builtin not in _NUMERIC:
                problems.append(f"{where}: a number where the XSD has {builtin}")
            return format(value, "f") if isinstance(value, Decimal) else repr(value)
        if isinstance(value, str):
            if builtin in _NUMERIC or builtin == "boolean":
                problems.append(f"{where}: a string where the XSD has {builtin}")
            return value
        problems.append(f"{where}: a {type(value).__name__} where the XSD has {builtin}")
        return ""

    # Validation -----------------------------------------------------------------------------

    def validate(self, element: str, document: Mapping[str, Any]) -> None:
        """Check a JSON ``document`` of the global ``element`` (``Invoice``, ``IntuitResponse``).

        Raises:
            SchemaError: Every problem the XSD (or the JSON type check) finds.
        """
        if element not in self.elements:
            raise SchemaError([f"the XSD has no global element {element}"])
        self.validate_xml(self.to_xml(element, document))

    def validate_xml(self, xml: etree._Element | bytes | str) -> None:
        """Check an XML document (a root element or its text) against the XSD."""
        if isinstance(xml, str | bytes):
            parser = etree.XMLParser(resolve_entities=False, no_network=True)
            raw = xml.encode() if isinstance(xml, str) else xml
            xml = etree.fromstring(raw, parser)
        if not self.xsd.validate(xml):
            raise SchemaError([_clean(e.message) for e in self.xsd.error_log])

    def validate_response(self, document: Mapping[str, Any]) -> None:
        """Check a JSON answer of the API (``{"Invoice": {...}, "time": ...}``)."""
        self.validate("IntuitResponse", document)


def _clean(message: str) -> str:
    return re.sub(r"\{http://schema\.intuit\.com/finance/v3\}", "", message)


@cache
def quickbooks_schema() -> QuickBooksSchema:
    """The schema, loaded once (about 0.1 s)."""
    return QuickBooksSchema()
