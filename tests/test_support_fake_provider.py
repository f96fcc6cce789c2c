"""Checks of the provider-independent fake base, through a provider of widgets.

Rate-limit tests assert on the fake's own counters and on the arrival times it recorded, never
on how long something took; where time matters the fake's clock is frozen and advanced.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.support.fake_provider import (
    FakeProvider,
    FakeProviderApp,
    FakeResponse,
    IdempotencyEntry,
    ProviderError,
    ProviderRequest,
    RateLimits,
    Rejection,
    Route,
    Window,
)

pytestmark = pytest.mark.block_network(allowed_hosts=[r"^127\.0\.0\.1$"])

T0 = 1_700_000_000.0
AUTH = {"Authorization": "Bearer tenant-1"}


def create_widget(app: WidgetApp, req: ProviderRequest) -> FakeResponse:
    widget = {"id": f"w{len(app.widgets) + 1}", "name": req.params.get("name")}
    app.widgets[widget["id"]] = widget
    app.count_created("widget")
    return FakeResponse(201, widget)


def list_widgets(app: WidgetApp, req: ProviderRequest) -> dict[str, Any]:
    return {"widgets": list(app.widgets.values())}


def get_widget(app: WidgetApp, req: ProviderRequest) -> dict[str, Any]:
    widget = app.widgets.get(req.path_params["widget"])
    if widget is None:
        raise ProviderError(404, "No such widget.")
    return widget


def publish_widget(app: WidgetApp, req: ProviderRequest) -> dict[str, Any]:
    return {**get_widget(app, req), "published": True}


class WidgetApp(FakeProviderApp):
    """Widgets, with Xero-like keys (a header, kept minutes) and limits (minute, concurrent)."""

    name = "widgets"
    routes = (
        Route("POST", "/widgets", create_widget),
        Route("GET", "/widgets", list_widgets),
        Route("GET", "/widgets/{widget}", get_widget),
        Route("POST", "/widgets/{widget}/publish", publish_widget),
    )
    default_key_lifetime = 300.0  # keys come in the default Idempotency-Key header
    default_rate_limits = RateLimits(windows=(Window(60, 60.0, "minute"),), concurrency=5)

    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self.widgets: dict[str, dict[str, Any]] = {}
        self.gate: threading.Event | None = None
        """When set, every operation waits for it (its key in flight, its slot taken)."""

    def authenticate(self, request: ProviderRequest) -> str:
        token = request.headers.get("authorization", "")
        if not token.startswith("Bearer "):
            raise ProviderError(401, "No token.")
        return token.removeprefix("Bearer ")

    def execute(self, request: ProviderRequest) -> FakeResponse:
        if self.gate is not None:
            self.gate.wait(timeout=10)
        return super().execute(request)

    def mark_replay(self, response: FakeResponse, entry: IdempotencyEntry) -> FakeResponse:
        response.headers["Replayed"] = entry.request_id
        return response

    def rate_limited(self, request: ProviderRequest, rejection: Rejection) -> FakeResponse:
        response = super().rate_limited(request, rejection)
        response.headers["X-Rate-Limit-Problem"] = rejection.problem
        return response

    def reset_objects(self) -> None:
        self.widgets.clear()

    def snapshot_objects(self) -> dict[str, Any]:
        return {"widgets": list(self.widgets.values())}


class QueryKeyWidgetApp(WidgetApp):
    """Keys in a query parameter, as QuickBooks' ``requestid``."""

    key_header = None
    key_query_param = "requestid"


class FakeWidgets(FakeProvider[WidgetApp]):
    def __init__(self, app: WidgetApp | None = None) -> None:
        super().__init__(app or WidgetApp())


def frozen(**settings: Any) -> FakeWidgets:
    """A fake whose clock stands still until a test advances it."""
    return FakeWidgets(WidgetApp(clock=lambda: T0, **settings))


@pytest.fixture
def fake() -> Iterator[FakeWidgets]:
    with frozen() as server:
        yield server


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        session.headers.update(AUTH)
        yield session


def create(
    http: requests.Session, fake: FakeWidgets, name: str = "a", key: str | None = None
) -> requests.Response:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return http.post(f"{fake.url}/widgets", json={"name": name}, headers=headers, timeout=10)


def create_apart(fake: FakeWidgets, name: str, key: str | None = None) -> requests.Response:
    """``create`` on its own connection (for another thread)."""
    with requests.Session() as session:
        session.headers.update(AUTH)
        return create(session, fake, name, key)


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the fake never got there"
        time.sleep(0.005)


def test_key_replays_then_expires_when_the_clock_passes_its_lifetime(
    fake: FakeWidgets, http: requests.Session
) -> None:
    first = create(http, fake, key="k1")
    fake.advance_clock(299)
    second = create(http, fake, key="k1")
    assert first.status_code == second.status_code == 201
    assert second.json() == first.json() == {"id": "w1", "name": "a"}
    assert second.headers["Replayed"] == first.headers["Request-Id"]
    assert fake.state()["idempotency_keys"] == 1

    fake.advance_clock(1)
    assert fake.state()["idempotency_keys"] == 0
    third = create(http, fake, key="k1")
    assert third.json()["id"] == "w2" and "Replayed" not in third.headers
    assert fake.state()["objects_created"] == {"widget": 2}
    assert [r.replayed for r in fake.requests] == [False, True, False]


def test_key_lifetime_is_configurable(fake: FakeWidgets, http: requests.Session) -> None:
    config = http.post(f"{fake.url}/_fake/config", json={"key_lifetime": 10}, timeout=5).json()
    assert config["key_lifetime"] == 10
    create(http, fake, key="k")
    clock = http.post(f"{fake.url}/_fake/clock", json={"advance": 10}, timeout=5).json()
    assert clock == {"now": T0 + 10, "offset": 10}
    assert create(http, fake, key="k").json()["id"] == "w2"


def test_key_from_a_query_parameter() -> None:
    with FakeWidgets(QueryKeyWidgetApp()) as fake, requests.Session() as http:
        http.headers.update(AUTH)
        url = f"{fake.url}/widgets?requestid=r1"
        one = http.post(url, json={"name": "a"}, timeout=5)
        two = http.post(url, json={"name": "a"}, timeout=5)
        three = http.post(url, json={"name": "a"}, headers={"Idempotency-Key": "x"}, timeout=5)
        assert one.json() == two.json() == three.json()
        assert "Replayed" in two.headers
        assert fake.state()["objects_created"] == {"widget": 1}
        assert [r.idempotency_key for r in fake.requests] == ["r1"] * 3


def test_keys_are_scoped_per_credential(fake: FakeWidgets, http: requests.Session) -> None:
    create(http, fake, key="k")
    other = http.post(
        f"{fake.url}/widgets",
        json={"name": "a"},
        headers={"Authorization": "Bearer tenant-2", "Idempotency-Key": "k"},
        timeout=5,
    )
    assert other.json()["id"] == "w2"


def test_a_different_body_under_one_key_is_refused(
    fake: FakeWidgets, http: requests.Session
) -> None:
    create(http, fake, "a", key="k")
    refused = create(http, fake, "b", key="k")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "idempotency"
    assert fake.state()["widgets"] == [{"id": "w1", "name": "a"}]


def test_a_duplicate_while_the_first_runs_is_in_progress(
    fake: FakeWidgets, http: requests.Session
) -> None:
    fake.app.gate = gate = threading.Event()
    results: list[requests.Response] = []
    first = threading.Thread(target=lambda: results.append(create_apart(fake, "a", key="k")))
    first.start()
    wait_until(lambda: fake.rate_limit_stats()["in_flight"] == 1)
    in_progress = create(http, fake, key="k")
    gate.set()
    first.join()
    assert in_progress.status_code == 409
    assert results[0].status_code == 201
    assert "Replayed" in create(http, fake, key="k").headers


def test_errors_are_not_kept_so_a_fixed_retry_runs(
    fake: FakeWidgets, http: requests.Session
) -> None:
    fake.inject_error("POST", "/widgets", status=400, message="bad name")
    rejected = create(http, fake, key="k")
    assert rejected.status_code == 400
    assert rejected.json()["error"]["message"] == "bad name"
    assert create(http, fake, key="k").status_code == 201
    assert fake.state()["objects_created"] == {"widget": 1}


def test_a_lost_response_runs_the_operation_once_and_the_retry_replays_it(
    fake: FakeWidgets, http: requests.Session
) -> None:
    fault = fake.inject_lost_response("POST", "/widgets")
    with pytest.raises(requests.ConnectionError):
        create(http, fake, key="k")
    assert fake.state()["widgets"] == [{"id": "w1", "name": "a"}]
    retry = create(http, fake, key="k")
    assert retry.status_code == 201 and "Replayed" in retry.headers
    assert retry.json()["id"] == "w1"
    assert fake.state()["objects_created"] == {"widget": 1}
    assert [(r.status, r.fault) for r in fake.requests] == [(0, "drop:after"), (201, None)]
    assert (fault.hits, fake.faults) == (1, [])


@pytest.mark.parametrize("sent", [0, 5])
def test_a_request_cut_short_by_a_dying_client_runs_nothing(
    fake: FakeWidgets, http: requests.Session, sent: int
) -> None:
    import socket
    from urllib.parse import urlsplit

    body = json.dumps({"name": "complete"}).encode()
    host = urlsplit(fake.url)
    with socket.create_connection((host.hostname, host.port)) as raw:
        head = (
            f"POST /widgets HTTP/1.1\r\nHost: {host.netloc}\r\n"
            f"Authorization: {AUTH['Authorization']}\r\nIdempotency-Key: cut\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        raw.sendall(head.encode() + body[:sent])  # then the client dies: EOF mid-body
    time.sleep(0.2)
    assert fake.state()["widgets"] == []
    complete = create(http, fake, name="complete", key="cut")
    assert complete.status_code == 201 and "Replayed" not in complete.headers


def test_a_drop_before_the_operation_runs_nothing(
    fake: FakeWidgets, http: requests.Session
) -> None:
    fake.inject_drop("POST", "/widgets")
    with pytest.raises(requests.ConnectionError):
        create(http, fake, key="k")
    assert fake.state()["widgets"] == []
    assert "Replayed" not in create(http, fake, key="k").headers


def test_faults_match_method_and_path_globs(fake: FakeWidgets, http: requests.Session) -> None:
    create(http, fake)
    fake.inject_error("POST", "/widgets/*/publish", status=503, times=2)
    fake.inject_error("GET", "/widgets/w", status=500)  # a prefix: /widgets/w1 too
    assert create(http, fake, "b").status_code == 201
    assert http.get(f"{fake.url}/widgets", timeout=5).status_code == 200
    assert http.get(f"{fake.url}/widgets/w1", timeout=5).status_code == 500
    assert http.get(f"{fake.url}/widgets/w1", timeout=5).status_code == 200
    publish = [http.post(f"{fake.url}/widgets/w1/publish", timeout=5) for _ in range(3)]
    assert [r.status_code for r in publish] == [503, 503, 200]
    assert [r.fault for r in fake.requests] == [None] * 3 + ["500", None, "503", "503", None]


def test_faults_through_the_control_endpoint(fake: FakeWidgets, http: requests.Session) -> None:
    faults = f"{fake.url}/_fake/faults"
    added = http.post(faults, json={"preset": "lost", "method": "POST", "path": "/widgets"})
    assert added.json()["faults"][0] | {"id": 0} == {
        "kind": "drop",
        "method": "POST",
        "path": "/widgets",
        "times": 1,
        "after": True,
        "status": 503,
        "message": "Service unavailable (injected by the kiki fake).",
        "code": None,
        "headers": {},
        "store": None,
        "seconds": 0.0,
        "id": 0,
        "hits": 0,
    }
    http.post(faults, json=[{"preset": "delay", "seconds": 0.01}, {"kind": "error", "status": 502}])
    assert len(http.get(faults).json()["faults"]) == 3
    invalid: list[dict[str, Any]] = [
        {"preset": "nope"},
        {"colour": "red"},
        {"preset": "drop", "id": 3},
    ]
    for bad in invalid:
        assert http.post(faults, json=bad).status_code == 400
    assert http.post(faults, json={"kind": "error", "times": 0}).status_code == 400
    assert http.delete(faults).json() == {"faults": []}


@pytest.mark.parametrize("count_rejected", [True, False])
def test_sliding_window_never_admits_more_than_n_in_any_interval(count_rejected: bool) -> None:
    limit, seconds = 5, 0.2
    limits = RateLimits(windows=(Window(limit, seconds),), count_rejected=count_rejected)
    app = WidgetApp(rate_limits=limits, latency=0.002)
    with FakeWidgets(app) as fake:

        def get(_: int) -> int:
            with requests.Session() as session:
                session.headers.update(AUTH)
                return session.get(f"{fake.url}/widgets", timeout=10).status_code

        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(get, range(300)))

    stats = fake.rate_limit_stats()
    assert stats["received"] == len(statuses) == 300
    assert stats["admitted"] == statuses.count(200) >= limit
    assert stats["rejected"] == statuses.count(429) == 300 - stats["admitted"]
    assert stats["windows"][0]["max_in_window"] <= limit
    # The same from the arrival times the fake recorded.
    admitted = sorted(r.time for r in fake.requests if r.rate_limited is None)
    oldest = 0
    for newest, arrival in enumerate(admitted):
        while admitted[oldest] < arrival - seconds:
            oldest += 1
        assert newest - oldest + 1 <= limit


def test_the_window_slides_with_the_clock(http: requests.Session) -> None:
    limits = RateLimits(windows=(Window(3, 10.0, "ten"),), count_rejected=False)
    with frozen(rate_limits=limits) as fake:
        statuses = [http.get(f"{fake.url}/widgets", timeout=5).status_code for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]
        fake.advance_clock(10)  # the window includes both ends: still full
        assert http.get(f"{fake.url}/widgets", timeout=5).status_code == 429
        fake.advance_clock(0.5)
        statuses = [http.get(f"{fake.url}/widgets", timeout=5).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]
        stats = fake.rate_limit_stats()
    assert (stats["received"], stats["admitted"], stats["rejected_by"]) == (10, 6, {"ten": 4})
    assert stats["windows"][0]["max_in_window"] == 3


def test_several_windows_apply_at_once(http: requests.Session) -> None:
    limits = RateLimits(
        windows=(Window(3, 1.0, "second"), Window(5, 60.0, "minute")), count_rejected=False
    )
    with frozen(rate_limits=limits) as fake:

        def get() -> requests.Response:
            return http.get(f"{fake.url}/widgets", timeout=5)

        assert [get().status_code for _ in range(3)] == [200] * 3
        second = get()
        assert second.status_code == 429
        assert second.headers["X-Rate-Limit-Problem"] == "second"
        assert second.headers["Retry-After"] == "1"
        fake.advance_clock(1.5)
        assert [get().status_code for _ in range(2)] == [200] * 2
        minute = get()
        assert minute.headers["X-Rate-Limit-Problem"] == "minute"
        assert minute.headers["Retry-After"] == "59"
        fake.advance_clock(60)
        assert get().status_code == 200
        stats = fake.rate_limit_stats()
    assert stats["rejected_by"] == {"second": 1, "minute": 1}
    assert [w["max_in_window"] for w in stats["windows"]] == [3, 5]


def test_rejected_requests_count_in_the_windows_by_default(http: requests.Session) -> None:
    limits = RateLimits(windows=(Window(3, 1.0, "second"), Window(5, 60.0, "minute")))
    with frozen(rate_limits=limits) as fake:
        statuses = [http.get(f"{fake.url}/widgets", timeout=5).status_code for _ in range(4)]
        fake.advance_clock(1.5)
        statuses += [http.get(f"{fake.url}/widgets", timeout=5).status_code for _ in range(2)]
        stats = fake.rate_limit_stats()
    # The 429 took a place in the minute: one request fits after the second window slid.
    assert statuses == [200, 200, 200, 429, 200, 429]
    assert stats["rejected_by"] == {"second": 1, "minute": 1}


def test_token_bucket(http: requests.Session) -> None:
    with frozen() as fake:
        http.post(
            f"{fake.url}/_fake/config",
            json={"rate_limits": {"bucket": {"rate": 1, "burst": 2}}},
            timeout=5,
        )
        statuses = [http.get(f"{fake.url}/widgets", timeout=5).status_code for _ in range(3)]
        fake.advance_clock(1)
        statuses.append(http.get(f"{fake.url}/widgets", timeout=5).status_code)
        assert statuses == [200, 200, 429, 200]
        assert fake.rate_limit_stats()["rejected_by"] == {"bucket": 1}


def test_the_concurrency_cap_answers_429(fake: FakeWidgets, http: requests.Session) -> None:
    fake.configure(rate_limits=RateLimits(concurrency=2))
    fake.app.gate = gate = threading.Event()
    with ThreadPoolExecutor(max_workers=2) as pool:
        held = [pool.submit(create_apart, fake, f"h{i}") for i in range(2)]
        wait_until(lambda: fake.rate_limit_stats()["in_flight"] == 2)
        refused = create(http, fake, "c")
        gate.set()
        assert [f.result().status_code for f in held] == [201, 201]
    assert refused.status_code == 429
    assert refused.headers["X-Rate-Limit-Problem"] == "concurrency"
    assert create(http, fake, "d").status_code == 201
    stats = fake.rate_limit_stats()
    assert (stats["max_in_flight"], stats["in_flight"]) == (2, 0)
    assert stats["rejected_by"] == {"concurrency": 1}


def test_requests_are_recorded_without_credentials(
    fake: FakeWidgets, http: requests.Session
) -> None:
    http.post(f"{fake.url}/widgets?x=1", json={"name": "a"}, headers={"Idempotency-Key": "k"})
    http.get(f"{fake.url}/nowhere")
    unauthenticated = requests.get(f"{fake.url}/widgets", timeout=5)
    assert unauthenticated.status_code == 401
    created, unknown, anonymous = fake.requests
    assert (created.method, created.path, created.query) == ("POST", "/widgets", "x=1")
    assert created.body == '{"name": "a"}'
    assert created.headers["idempotency-key"] == "k"
    assert "authorization" not in created.headers
    assert (created.route, created.status, created.time) == ("/widgets", 201, T0)
    assert (unknown.route, unknown.status) == (None, 404)
    assert anonymous.status == 401
    listed = http.get(f"{fake.url}/_fake/requests?since=1").json()["requests"]
    assert [r["path"] for r in listed] == ["/nowhere", "/widgets"]


def test_control_endpoints_and_reset(fake: FakeWidgets, http: requests.Session) -> None:
    assert http.get(f"{fake.url}/_fake/health").json() == {"ok": True, "url": fake.url}
    create(http, fake, key="k")
    fake.advance_clock(5)
    state = http.get(f"{fake.url}/_fake/state").json()
    assert state["widgets"] == [{"id": "w1", "name": "a"}]
    assert state["objects_created"] == {"widget": 1}
    assert state["requests_by_route"] == {"POST /widgets": 1}
    assert state["rate_limits"]["limits"]["windows"] == [
        {"limit": 60, "seconds": 60.0, "name": "minute"}
    ]
    assert state["clock"] == {"now": T0 + 5, "offset": 5}
    config = http.post(
        f"{fake.url}/_fake/config",
        json={"latency": 0.001, "rate_limits": {"windows": [[10, 1, "second"]]}},
    ).json()
    assert config["latency"] == 0.001
    assert config["rate_limits"]["windows"] == [{"limit": 10, "seconds": 1, "name": "second"}]
    assert http.get(f"{fake.url}/_fake/config").json() == config
    assert http.post(f"{fake.url}/_fake/config", json={"bogus": 1}).status_code == 400
    assert http.post(f"{fake.url}/_fake/clock", json={"advance": -1}).status_code == 400
    assert http.get(f"{fake.url}/_fake/nope").status_code == 404

    assert http.post(f"{fake.url}/_fake/reset").json() == {"ok": True}
    state = http.get(f"{fake.url}/_fake/state").json()
    assert (state["widgets"], state["requests"], state["idempotency_keys"]) == ([], [], 0)
    assert (state["objects_created"], state["clock"]["offset"]) == ({}, 0)
    assert state["rate_limits"]["received"] == 0
    assert state["config"]["latency"] == 0.001  # settings stay


class MarkableWidgetApp(WidgetApp):
    """Widgets that stand for invoices in the control calls."""

    def mark_invoice(self, invoice_id: str, state: str, amount: str | None = None) -> Any:
        widget = self.widgets[invoice_id]
        if state not in ("paid", "void"):
            raise ValueError(f"unknown state {state!r}")
        widget["state"] = state
        return widget

    def duplicate_invoice(self, invoice_id: str) -> str:
        copied = {**self.widgets[invoice_id], "id": f"w{len(self.widgets) + 1}"}
        self.widgets[copied["id"]] = copied
        return str(copied["id"])


def test_invoice_control_calls_and_the_writes_received(http: requests.Session) -> None:
    with FakeWidgets(MarkableWidgetApp(clock=lambda: T0)) as fake:
        create(http, fake, key="k")
        start = len(fake.requests)
        assert http.get(f"{fake.url}/widgets").status_code == 200
        assert fake.writes_since(start) == []
        assert [r.path for r in fake.writes_since(0)] == ["/widgets"]
        mark = f"{fake.url}/_fake/invoices/mark"
        marked = http.post(mark, json={"invoice": "w1", "state": "paid"})
        assert marked.json() == {"id": "w1", "name": "a", "state": "paid"}
        assert http.post(mark, json={"invoice": "w9", "state": "paid"}).status_code == 404
        assert http.post(mark, json={"invoice": "w1", "state": "lost"}).status_code == 400
        copied = http.post(f"{fake.url}/_fake/invoices/duplicate", json={"invoice": "w1"})
        assert copied.json() == {"id": "w2"}
        assert fake.mark_invoice("w2", "void")["state"] == "void"
        assert len(fake.requests) == start + 1  # control calls are not recorded


def test_invoice_control_calls_of_a_fake_without_them(
    fake: FakeWidgets, http: requests.Session
) -> None:
    answer = http.post(f"{fake.url}/_fake/invoices/mark", json={"invoice": "w1", "state": "paid"})
    assert answer.status_code == 404 and "cannot mark invoices" in answer.json()["error"]
