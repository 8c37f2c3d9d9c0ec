"""`servegrid top`: live per-model request rate, server-error ratio and p50/p99 latency, from the mesh's metrics.

Two scrapes of each Envoy's /stats/prometheus, `--interval` apart, give the rates (services/mesh/stats.py
reads the series, the same ones the SLO rules read); or, with `--prometheus`, a Prometheus server that
scrapes the Envoys answers the same questions in PromQL.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from services.mesh import stats
from services.stack.local import StackSettings

STATS_PATH = "/stats/prometheus"


@dataclass(frozen=True)
class Row:
    """One line of the table: a model (or one of its versions) over the last interval."""

    model: str
    version: int | None
    requests_per_s: float
    error_ratio: float | None  # None: no requests
    p50_ms: float | None
    p99_ms: float | None


class TopError(RuntimeError):
    """A source could not be read; the message says which and what to check."""


def _grouped(
    counts: Mapping[stats.ModelVersion, stats.VersionCounts], by_version: bool
) -> dict[tuple[str, int | None], stats.VersionCounts]:
    out: dict[tuple[str, int | None], stats.VersionCounts] = {}
    for (model, version), c in counts.items():
        out.setdefault((model, version if by_version else None), stats.VersionCounts()).add(c)
    return out


def rows_between(
    before: Mapping[stats.ModelVersion, stats.VersionCounts],
    after: Mapping[stats.ModelVersion, stats.VersionCounts],
    seconds: float,
    by_version: bool = False,
) -> list[Row]:
    """The rates between two scrapes (summed over Envoys), busiest first."""
    earlier = _grouped(before, by_version)
    rows = []
    for key, now in _grouped(after, by_version).items():
        delta = now.minus(earlier.get(key, stats.VersionCounts()))
        ratio = delta.server_errors / delta.requests if delta.requests > 0 else None
        rows.append(
            Row(
                key[0],
                key[1],
                delta.requests / seconds,
                ratio,
                stats.quantile_ms(0.5, delta.buckets_ms),
                stats.quantile_ms(0.99, delta.buckets_ms),
            )
        )
    return sorted(rows, key=lambda r: (-r.requests_per_s, r.model, r.version or 0))


def stats_url(address: str) -> str:
    """An Envoy admin (or stats listener) address or URL, as the URL of its Prometheus stats."""
    url = address if "://" in address else f"http://{address}"
    return url if url.rstrip("/").endswith(STATS_PATH) else url.rstrip("/") + STATS_PATH


def _get(url: str, timeout_s: float = 5.0) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            body: bytes = reply.read()
            return body
    except (urllib.error.URLError, OSError) as err:
        raise TopError(f"cannot read {url}: {err}") from err


def scrape(urls: Sequence[str]) -> dict[stats.ModelVersion, stats.VersionCounts]:
    """One scrape of every Envoy, added up."""
    return stats.merge(stats.read_scrape(_get(url).decode()) for url in urls)


def _query(base: str, expr: str) -> list[dict[str, Any]]:
    url = f"{base.rstrip('/')}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    reply = json.loads(_get(url))
    if reply.get("status") != "success":
        raise TopError(f"Prometheus at {base} refused the query: {reply.get('error', reply)}")
    result: list[dict[str, Any]] = reply["data"]["result"]
    return result


def _finite(value: str) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def rows_from_prometheus(base: str, window: str, by_version: bool = False) -> list[Row]:
    """The same rates, asked of a Prometheus server over `window`."""
    by = ("model", "version") if by_version else ("model",)

    def keyed(expr: str) -> dict[tuple[str, int | None], float | None]:
        out = {}
        for sample in _query(base, expr):
            labels = sample["metric"]
            version = int(labels["version"]) if by_version and "version" in labels else None
            out[labels.get("model", ""), version] = _finite(sample["value"][1])
        return out

    requests = keyed(stats.requests_rate(window, by))
    errors = keyed(stats.server_errors_rate(window, by))
    p50 = keyed(stats.latency_quantile_seconds(0.5, window, by))
    p99 = keyed(stats.latency_quantile_seconds(0.99, window, by))

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000

    rows = []
    for key, rate in requests.items():
        rate = rate or 0.0
        ratio = (errors.get(key) or 0.0) / rate if rate > 0 else None
        rows.append(Row(key[0], key[1], rate, ratio, ms(p50.get(key)), ms(p99.get(key))))
    return sorted(rows, key=lambda r: (-r.requests_per_s, r.model, r.version or 0))


def _ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def render(rows: Sequence[Row], source: str, seconds: float, by_version: bool) -> Table:
    table = Table(title=f"servegrid top · {source} · last {seconds:.0f}s", title_justify="left")
    table.add_column("model")
    if by_version:
        table.add_column("version", justify="right")
    for column in ("req/s", "errors", "p50", "p99"):
        table.add_column(column, justify="right")
    for row in rows:
        errors = "—" if row.error_ratio is None else f"{row.error_ratio:.2%}"
        style = "red" if row.error_ratio else None
        cells = [row.model, *([f"v{row.version}"] if by_version else [])]
        cells += [f"{row.requests_per_s:.1f}", errors, _ms(row.p50_ms), _ms(row.p99_ms)]
        table.add_row(*cells, style=style)
    if not rows:
        table.caption = "no model traffic seen yet"
    return table


def top(
    envoy: Annotated[
        list[str] | None,
        typer.Option(
            help="Envoy admin address or stats URL (…/stats/prometheus); repeat for several Envoys. "
            "Default: the local stack's admin port."
        ),
    ] = None,
    prometheus: Annotated[
        str, typer.Option(help="A Prometheus server URL that scrapes the Envoys: ask it instead of scraping.")
    ] = "",
    interval: Annotated[
        float, typer.Option(min=0.2, help="Seconds between samples (Envoy publishes histograms every 5 s).")
    ] = 5.0,
    once: Annotated[bool, typer.Option(help="Print one sample (two scrapes --interval apart) and exit.")] = False,
    versions: Annotated[bool, typer.Option(help="One row per model version.")] = False,
    window: Annotated[str, typer.Option(help="With --prometheus: the rate window, e.g. 1m.")] = "1m",
) -> None:
    """Live per-model request rate, server-error ratio and p50/p99 latency, from Envoy's stats."""
    if prometheus:
        source, window_s = prometheus, _window_seconds(window)

        def sample() -> tuple[list[Row], float]:
            return rows_from_prometheus(prometheus, window, versions), window_s

    else:
        urls = [stats_url(e) for e in envoy] if envoy else [stats_url(f"127.0.0.1:{StackSettings().envoy_admin_port}")]
        source = ", ".join(urls)
        state: dict[str, Any] = {"before": None, "at": 0.0}

        def sample() -> tuple[list[Row], float]:
            if state["before"] is None:
                state["before"], state["at"] = scrape(urls), time.monotonic()
                time.sleep(interval)
            after, now = scrape(urls), time.monotonic()
            seconds = now - state["at"]
            rows = rows_between(state["before"], after, seconds, versions)
            state["before"], state["at"] = after, now
            return rows, seconds

    err_console = Console(stderr=True)
    try:
        if once:
            rows, seconds = sample()
            Console().print(render(rows, source, seconds, versions))
            return
        rows, seconds = sample()
        with Live(render(rows, source, seconds, versions), console=Console(), auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                rows, seconds = sample()
                live.update(render(rows, source, seconds, versions), refresh=True)
    except TopError as err:
        err_console.print(f"[red]{err}[/] (is the mesh up? `servegrid status`)")
        raise typer.Exit(1) from err
    except KeyboardInterrupt:
        return


def _window_seconds(window: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        return float(window[:-1]) * units[window[-1]]
    except (KeyError, ValueError) as err:
        raise typer.BadParameter(f"{window!r} is not a window like 30s, 1m or 1h") from err
