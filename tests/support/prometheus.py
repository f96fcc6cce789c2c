"""A throwaway Prometheus 2.x server on 127.0.0.1, backfilled with history, for tests.

``prometheus_server(openmetrics, workdir)`` writes the OpenMetrics text to a file, turns it into
TSDB blocks with ``promtool tsdb create-blocks-from openmetrics``, starts ``prometheus`` on those
blocks (no scrape targets, so it never touches the network) and yields its base URL
``http://127.0.0.1:PORT`` once ``/-/ready`` answers and the backfilled series are queryable. The
yielded value is a ``PrometheusUrl`` (a ``str`` that also carries the server's ``pid``, ``port``
and ``data_dir``). On exit it stops the server by pid (SIGTERM, SIGKILL after a timeout); the
server's log stays in ``workdir / "prometheus.log"``.

``openmetrics_text(...)`` renders counter and gauge samples as the OpenMetrics text that promtool
reads. What promtool 2.42 requires of it:

- the text ends with ``# EOF`` (otherwise: "data does not end with # EOF");
- every sample carries a timestamp in Unix seconds;
- counter samples are named ``<family>_total`` under ``# TYPE <family> counter``.

Two server settings matter for backfilled data: retention is measured back from the newest block
(not from the wall clock), so the default 15 days would delete most of a backfilled month; and
promtool cuts 2-hour blocks unless given the (hidden) ``--max-block-duration`` flag, which
would mean hundreds of blocks for a month of data.

A missing binary skips the test with the command that installs it, or fails it under
``KIKI_REQUIRE_SERVERS=1``.

pytest-recording's ``--block-network`` blocks Python sockets even to 127.0.0.1, so tests that
talk to the server need ``@pytest.mark.block_network(allowed_hosts=[LOCALHOST_ONLY])``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from tests.support.servers import find_binary, free_port

INSTALL_HINT = "apt-get install -y prometheus"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
LOCALHOST_ONLY = r"^127\.0\.0\.1$"
"""For ``@pytest.mark.block_network(allowed_hosts=[LOCALHOST_ONLY])`` (a regex, fully anchored)."""
_PORT_ATTEMPTS = 3
# Blocks of up to 4374 h (promtool picks the largest 2h*3^n that fits) instead of 2 h each.
_MAX_BLOCK_DURATION = "8760h"
_CONFIG = """\
# No scrape targets, rules or alertmanagers: the server only serves the backfilled blocks.
global:
  scrape_interval: 1h
  evaluation_interval: 1h
"""


class PrometheusUrl(str):
    """The base URL of a running test server, with the server's pid, port and data dir."""

    pid: int
    port: int
    data_dir: Path

    def __new__(cls, url: str, *, pid: int, port: int, data_dir: Path) -> PrometheusUrl:
        self = super().__new__(cls, url)
        self.pid = pid
        self.port = port
        self.data_dir = data_dir
        return self


@dataclass(frozen=True)
class Series:
    """One series to backfill: its labels and its ``(unix seconds, value)`` samples."""

    labels: Mapping[str, str]
    samples: Sequence[tuple[int, Decimal | str]] = field(default_factory=tuple)


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_lines(name: str, series: Sequence[Series]) -> Iterator[str]:
    for one in series:
        labels = ",".join(f'{k}="{_label_value(v)}"' for k, v in one.labels.items())
        selector = f"{name}{{{labels}}}" if labels else name
        for stamp, value in sorted(one.samples, key=lambda s: s[0]):
            text = format(value, "f") if isinstance(value, Decimal) else value
            yield f"{selector} {text} {stamp}"


def openmetrics_text(
    counters: Mapping[str, Sequence[Series]] | None = None,
    gauges: Mapping[str, Sequence[Series]] | None = None,
) -> str:
    """Render samples as OpenMetrics text for ``promtool tsdb create-blocks-from openmetrics``.

    Args:
        counters: Sample name (ending in ``_total``) -> series; values are decimal strings or
            Decimals (``"NaN"`` is allowed, to test how NaN is handled).
        gauges: Gauge name -> series.
    """
    lines: list[str] = []
    for name, series in (counters or {}).items():
        if not name.endswith("_total"):
            raise ValueError(f"an OpenMetrics counter sample is named <family>_total, not {name}")
        lines.append(f"# TYPE {name.removesuffix('_total')} counter")
        lines.extend(_sample_lines(name, series))
    for name, series in (gauges or {}).items():
        lines.append(f"# TYPE {name} gauge")
        lines.extend(_sample_lines(name, series))
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(promtool: str, openmetrics: str, workdir: Path) -> Path:
    """Write ``openmetrics`` to ``workdir`` and turn it into TSDB blocks; return the data dir."""
    source = workdir / "backfill.om.txt"
    source.write_text(openmetrics, encoding="utf-8")
    data_dir = workdir / "data"
    command = [promtool, "tsdb", "create-blocks-from", "openmetrics", "--quiet"]
    done = subprocess.run(
        [*command, f"--max-block-duration={_MAX_BLOCK_DURATION}", str(source), str(data_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "max-block-duration" in done.stderr:
        # A promtool without the hidden flag: 2-hour blocks are slower to load, but work.
        done = subprocess.run(
            [*command, str(source), str(data_dir)], capture_output=True, text=True, check=False
        )
    if done.returncode != 0:
        raise RuntimeError(f"promtool backfill failed ({done.returncode}):\n{done.stderr}")
    return data_dir


def _get_json(url: str, timeout: float = 2.0) -> object:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_until_ready(base_url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for ``/-/ready`` and for the backfilled series to be visible to queries."""
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise _StartFailed(log.read_text(errors="replace"))
        try:
            with urllib.request.urlopen(f"{base_url}/-/ready", timeout=2.0) as response:
                ready = response.status == 200
            names = _get_json(f"{base_url}/api/v1/label/__name__/values") if ready else None
            if isinstance(names, dict) and names.get("data"):
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() > deadline:
            log_text = log.read_text(errors="replace")
            raise RuntimeError(f"Prometheus was not ready after {START_TIMEOUT} s:\n{log_text}")
        time.sleep(0.05)


class _StartFailed(RuntimeError):
    """The server exited during start-up; the message is its log."""


def stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """Stop the server by its pid: SIGTERM, then SIGKILL after ``timeout``."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(timeout=5.0)


def scrape_config(targets: Sequence[str], interval: str = "1s") -> str:
    """A config scraping ``targets`` (``127.0.0.1:PORT``, path ``/metrics``) every ``interval``."""
    listed = ", ".join(f"'{target}'" for target in targets)
    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        "scrape_configs:\n"
        "  - job_name: kiki-billing\n"
        f"    scrape_interval: {interval}\n"
        f"    scrape_timeout: {interval}\n"
        f"    static_configs:\n      - targets: [{listed}]\n"
    )


@contextlib.contextmanager
def prometheus_server(
    openmetrics: str | None,
    workdir: Path,
    *,
    port: int | None = None,
    scrape: Sequence[str] = (),
) -> Iterator[PrometheusUrl]:
    """Backfill ``openmetrics`` into a new Prometheus on 127.0.0.1 and yield its base URL.

    Args:
        openmetrics: The history to serve (see :func:`openmetrics_text`); ``None``: no
            history (a server that only scrapes).
        workdir: An empty directory for the data, the config and the server log.
        port: A fixed port (e.g. 9090 to record cassettes); a free one when omitted.
        scrape: ``127.0.0.1:PORT`` targets to scrape every second (only on this machine).
    """
    prometheus = find_binary("prometheus", INSTALL_HINT)
    promtool = find_binary("promtool", INSTALL_HINT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if openmetrics is None:
        data_dir = workdir / "data"
        data_dir.mkdir(exist_ok=True)
    else:
        data_dir = backfill(promtool, openmetrics, workdir)
    if any(not target.startswith("127.0.0.1:") for target in scrape):
        raise ValueError("a test server scrapes only 127.0.0.1")
    config = workdir / "prometheus.yml"
    config.write_text(scrape_config(scrape) if scrape else _CONFIG, encoding="utf-8")
    log = workdir / "prometheus.log"

    process: subprocess.Popen[bytes] | None = None
    try:
        for attempt in range(1 if port is not None else _PORT_ATTEMPTS):
            chosen = port if port is not None else free_port()
            with log.open("wb") as log_file:
                process = subprocess.Popen(
                    [
                        prometheus,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={data_dir}",
                        f"--web.listen-address=127.0.0.1:{chosen}",
                        # Retention counts back from the newest block, not from today.
                        "--storage.tsdb.retention.time=100y",
                        "--log.level=warn",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                )
            base_url = f"http://127.0.0.1:{chosen}"
            try:
                _wait_until_ready(base_url, process, log)
            except _StartFailed as exc:
                process = None
                if "address already in use" in str(exc) and attempt + 1 < _PORT_ATTEMPTS:
                    continue
                raise RuntimeError(f"Prometheus exited during start-up:\n{exc}") from None
            yield PrometheusUrl(base_url, pid=process.pid, port=chosen, data_dir=data_dir)
            return
    finally:
        if process is not None:
            stop_process(process)
