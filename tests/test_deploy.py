"""The deployment files are valid: every Kubernetes manifest against the Kubernetes schema
(kubernetes-validate's bundled schemas, offline, strict: an unknown field is an error), and
the compose file against the Compose Specification's JSON schema (vendored with its provenance
in tests/specs/compose/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_there_are_manifests_for_every_part() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert {"Deployment", "HorizontalPodAutoscaler", "CronJob", "ConfigMap"} <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_against_the_kubernetes_schema(path: Path) -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in documents(path):
        # Raises ValidationError naming the field; strict: unknown fields are errors too.
        kubernetes_validate.validate(doc, version, strict=True)


def test_secrets_are_referenced_never_written() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert "Secret" not in kinds
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["kind"] == "ConfigMap":
                assert not any(k.endswith(("_KEY", "_URL", "SECRET", "TOKEN")) for k in doc["data"])
    worker = documents(DEPLOY / "k8s" / "worker.yaml")[0]
    sources = worker["spec"]["template"]["spec"]["containers"][0]["envFrom"]
    assert {"secretRef": {"name": "kiki-billing-secrets"}} in sources
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["x-kiki"]["env_file"] == ["kiki.env"]


def test_worker_has_probes_and_the_push_runs_monthly() -> None:
    by_kind = {doc["kind"]: doc for path in MANIFESTS for doc in documents(path)}
    container = by_kind["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert {"livenessProbe", "readinessProbe", "startupProbe"} <= set(container)
    assert container["args"][0] == "worker"
    cron = by_kind["CronJob"]["spec"]
    assert cron["schedule"] == "0 6 1 * *" and cron["concurrencyPolicy"] == "Forbid"
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == by_kind["Deployment"]["metadata"]["name"]


def test_compose_file_validates_against_the_compose_spec() -> None:
    import jsonschema

    schema = json.loads((REPO / "tests" / "specs" / "compose" / "compose_spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{list(e.absolute_path)}: {e.message}" for e in errors]
    services = compose["services"]
    assert {"postgres", "redis", "worker", "push", "metrics", "webhooks"} <= set(services)
    assert services["worker"]["command"][0] == "worker"
    assert "--executor" in services["push"]["entrypoint"]


def test_the_compose_validation_catches_a_mistake() -> None:
    import jsonschema

    schema = json.loads((REPO / "tests" / "specs" / "compose" / "compose_spec.json").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    compose["services"]["worker"]["restart_policy"] = "always"  # not a service key
    assert list(jsonschema.Draft201909Validator(schema).iter_errors(compose))


def test_the_kubernetes_validation_catches_a_mistake() -> None:
    import kubernetes_validate

    doc = documents(DEPLOY / "k8s" / "worker.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
