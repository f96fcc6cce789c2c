"""Finding adapters: the ``kiki_billing.adapters`` entry-point group, nothing else.

Built-in adapters are registered in this package's own metadata exactly like a third-party
package registers its own, so the core never imports an adapter by name.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from kiki_billing.errors import ConfigurationError
from kiki_billing.logging import register_secrets
from kiki_billing.plugin import BillingAdapter, CredentialStore

ENTRY_POINT_GROUP = "kiki_billing.adapters"


@dataclass(frozen=True)
class AdapterInfo:
    """What ``kiki-billing adapters`` shows about one installed adapter."""

    name: str
    value: str
    distribution: str | None
    sdk_present: bool
    extra: str | None
    description: str
    load_error: str | None = None

    @property
    def install(self) -> str | None:
        """The command that installs the adapter's SDK, ready to paste into a shell."""
        if self.sdk_present or not self.extra:
            return None
        return f"pip install 'kiki-billing[{self.extra}]'"


PACKAGES_VARIABLE = "KIKI_ADAPTER_PACKAGES"
"""Comma-separated distributions whose adapters load (unset: every installed one)."""


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@cache
def _entry_points() -> dict[str, EntryPoint]:
    wanted = os.environ.get(PACKAGES_VARIABLE, "").strip()
    allowed = {_normal(n) for n in wanted.split(",") if n.strip()} if wanted else None
    found = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        dist = _normal(point.dist.name) if point.dist is not None else None
        if allowed is None or dist in allowed:
            found[point.name] = point
    return found


def reset_cache() -> None:
    """Forget the entry points read so far (tests that install an adapter at run time)."""
    _entry_points.cache_clear()


def known_adapter_names() -> list[str]:
    """Names of every adapter registered in the environment."""
    return sorted(_entry_points())


def load_adapter_class(name: str) -> type[BillingAdapter[Any, Any]]:
    """The adapter class registered as ``name``.

    Raises:
        ConfigurationError: No such adapter, its SDK is missing (naming the extra to install),
            or the entry point does not name a :class:`BillingAdapter`.
    """
    points = _entry_points()
    if name not in points:
        known = ", ".join(sorted(points)) or "none"
        raise ConfigurationError(f"unknown target {name!r} (installed adapters: {known})")
    try:
        cls = points[name].load()
    except ImportError as exc:
        raise ConfigurationError(
            f"adapter {name!r} cannot be loaded: {exc}; is its package installed?"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, BillingAdapter)):
        raise ConfigurationError(f"entry point {name!r} is not a BillingAdapter: {cls!r}")
    missing = [module for module in cls.requires if importlib.util.find_spec(module) is None]
    if missing:
        install = (
            f"pip install 'kiki-billing[{cls.extra}]'" if cls.extra else f"pip install {missing[0]}"
        )
        raise ConfigurationError(
            f"adapter {name!r} needs the {', '.join(missing)} package: {install}"
        )
    return cls


CredentialsFactory = Callable[[str, str], CredentialStore]


def create_adapter(
    name: str, credentials: CredentialsFactory | None = None
) -> BillingAdapter[Any, Any]:
    """Load, configure and instantiate the adapter ``name``.

    Args:
        name: The target name.
        credentials: Makes the credential store of ``(target, account)``; without it the
            adapter keeps refreshed tokens in memory only.
    """
    cls = load_adapter_class(name)
    adapter = cls(cls.read_settings())
    if credentials is not None:
        adapter.credentials = credentials(name, adapter.account)
    register_secrets(adapter.secrets())
    adapter.check_ready()
    return adapter


def describe_adapters() -> list[AdapterInfo]:
    """Every registered adapter, whether its SDK is present, and which extra installs it."""
    infos = []
    for name, point in sorted(_entry_points().items()):
        dist = point.dist.name if point.dist is not None else None
        try:
            cls = point.load()
        except ImportError as exc:
            infos.append(AdapterInfo(name, point.value, dist, False, None, "", str(exc)))
            continue
        present = all(importlib.util.find_spec(m) is not None for m in getattr(cls, "requires", ()))
        infos.append(
            AdapterInfo(
                name=name,
                value=point.value,
                distribution=dist,
                sdk_present=present,
                extra=getattr(cls, "extra", None),
                description=getattr(cls, "description", "") or (cls.__doc__ or "").strip(),
            )
        )
    return infos
