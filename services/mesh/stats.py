"""What Envoy's stats say about each model version: which series count its requests, server errors and latency.

Every inference passes Envoy, through one cluster per model version and protocol (`kserve|MODEL|vN|grpc`,
`…|http`: services/mesh/names.py), so Envoy's per-cluster stats are the data plane's metrics. This module
is the one reading of them: the PromQL the SLO rules and dashboards are rendered from
(scripts/gen_observability.py), and the scrape arithmetic `servegrid top` does (services/cli/top.py).

The series (checked on Envoy 1.40's /stats/prometheus):
- gRPC clusters: `envoy_cluster_grpc_total` counts calls; `envoy_cluster_grpc{grpc_status="N"}` counts them by
  grpc-status (the grpc_stats filter and the stats tag in services/mesh/bootstrap.py). Envoy's
  `upstream_rq_xx` cannot tell: a gRPC error travels in the trailers of an HTTP 200.
- HTTP (KServe REST) clusters: `envoy_cluster_upstream_rq_completed` and `envoy_cluster_upstream_rq_xx
  {envoy_response_code_class}`.
- Both: `envoy_cluster_upstream_rq_time` (a histogram in milliseconds: Envoy's, with its default buckets).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from services.mesh import names

# Server-side failures, the ones an availability SLO counts: UNKNOWN, DEADLINE_EXCEEDED, INTERNAL,
# UNAVAILABLE, DATA_LOSS. The caller's own mistakes (INVALID_ARGUMENT, NOT_FOUND, …), refused credentials
# and rate limits are not the service failing. DEADLINE_EXCEEDED counts: a model too slow for its
# callers' deadlines is failing them (Envoy answers it when the grpc-timeout passes).
SERVER_ERROR_GRPC_CODES = (2, 4, 13, 14, 15)
SERVER_ERROR_HTTP_CLASS = "5"
# Envoy's default histogram bucket bounds, milliseconds, as its /stats/prometheus prints them in `le`.
# A latency threshold must be one of them: the SLI reads that bucket.
ENVOY_BUCKETS_MS = (
    "0.5",
    "1",
    "5",
    "10",
    "25",
    "50",
    "100",
    "250",
    "500",
    "1000",
    "2500",
    "5000",
    "10000",
    "30000",
    "60000",
    "300000",
    "600000",
    "1800000",
    "3600000",
)

GRPC_TOTAL = "envoy_cluster_grpc_total"
GRPC_BY_STATUS = "envoy_cluster_grpc"
HTTP_COMPLETED = "envoy_cluster_upstream_rq_completed"
HTTP_BY_CLASS = "envoy_cluster_upstream_rq_xx"
RQ_TIME_MS = "envoy_cluster_upstream_rq_time"
CLUSTER_LABEL = "envoy_cluster_name"

# A version cluster's name, as a regex (RE2 and Python alike). `[|]` rather than `\|`: the separator
# needs no escaping in PromQL strings, YAML or JSON.
_SEP = f"[{names.SEPARATOR}]"
CLUSTER_PATTERN = f"{names.CLUSTER_PREFIX}{_SEP}([^|]+){_SEP}v([0-9]+){_SEP}(grpc|http)"
_CLUSTER = re.compile(CLUSTER_PATTERN)
# Model ids as the registry allows them: safe inside a regex alternation.
MODEL_ID = re.compile(r"[a-z][a-z0-9_-]*")


def parse_cluster(name: str) -> tuple[str, int, str] | None:
    """(model, version, protocol) of a version cluster's name; None for any other cluster."""
    match = _CLUSTER.fullmatch(name)
    return (match[1], int(match[2]), match[3]) if match else None


# --- PromQL ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    """Which models a query covers: all of them, only `only`, all but `excluding`, or those a regex `pattern`
    matches (a dashboard's `$model` variable)."""

    only: tuple[str, ...] = ()
    excluding: tuple[str, ...] = ()
    pattern: str = ""

    def __post_init__(self) -> None:
        for model in (*self.only, *self.excluding):
            if not MODEL_ID.fullmatch(model):
                raise ValueError(f"{model!r} is not a model id ([a-z][a-z0-9_-]*)")

    def matchers(self, protocol: str) -> str:
        model = f"({'|'.join(self.only)})" if self.only else f"({self.pattern})" if self.pattern else "[^|]+"
        out = f'{CLUSTER_LABEL}=~"{names.CLUSTER_PREFIX}{_SEP}{model}{_SEP}v[0-9]+{_SEP}{protocol}"'
        if self.excluding:
            out += f', {CLUSTER_LABEL}!~"{names.CLUSTER_PREFIX}{_SEP}({"|".join(self.excluding)}){_SEP}.*"'
        return out


ALL = Models()


def indent(text: str) -> str:
    """Two spaces before every line: how the rendered PromQL nests."""
    return "\n".join(f"  {line}" for line in text.splitlines())


def _labelled(expr: str, by: Sequence[str]) -> str:
    """`model` and `version` labels from the cluster name, those of them `by` groups on."""
    for label, group in (("model", "$1"), ("version", "$2")):
        if label in by:
            expr = f'label_replace(\n{indent(expr)},\n  "{label}", "{group}", "{CLUSTER_LABEL}", "{CLUSTER_PATTERN}"\n)'
    return expr


def _sum(by: Sequence[str], expr: str) -> str:
    return f"sum by ({', '.join(by)}) (\n{indent(expr)}\n)"


def _either(*exprs: str) -> str:
    return "\nor\n".join(exprs)


def requests_rate(window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """Requests per second to each model (version), gRPC and REST together."""
    grpc = f"rate({GRPC_TOTAL}{{{models.matchers('grpc')}}}[{window}])"
    http = f"rate({HTTP_COMPLETED}{{{models.matchers('http')}}}[{window}])"
    return _sum(by, _labelled(_either(grpc, http), by))


def server_errors_rate(window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """Server-side failures per second (SERVER_ERROR_GRPC_CODES, HTTP 5xx); nothing while there are none."""
    codes = "|".join(str(c) for c in SERVER_ERROR_GRPC_CODES)
    grpc = f'rate({GRPC_BY_STATUS}{{{models.matchers("grpc")}, {names.GRPC_STATUS_TAG}=~"{codes}"}}[{window}])'
    http = (
        f'rate({HTTP_BY_CLASS}{{{models.matchers("http")}, envoy_response_code_class="{SERVER_ERROR_HTTP_CLASS}"}}'
        f"[{window}])"
    )
    return _sum(by, _labelled(_either(grpc, http), by))


def grpc_status_rate(window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """gRPC calls per second by grpc-status (the `grpc_status` label kept)."""
    expr = f"rate({GRPC_BY_STATUS}{{{models.matchers('grpc')}}}[{window}])"
    return _sum((*by, names.GRPC_STATUS_TAG), _labelled(expr, by))


def http_class_rate(window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """KServe REST responses per second by HTTP status class (the `envoy_response_code_class` label kept)."""
    expr = f"rate({HTTP_BY_CLASS}{{{models.matchers('http')}}}[{window}])"
    return _sum((*by, "envoy_response_code_class"), _labelled(expr, by))


def _rq_time(series: str, window: str, by: Sequence[str], models: Models, extra: str = "") -> str:
    parts = [
        f"rate({RQ_TIME_MS}_{series}{{{models.matchers(protocol)}{extra}}}[{window}])" for protocol in names.PROTOCOLS
    ]
    return _labelled(_either(*parts), by)


def latency_within_rate(window: str, threshold_ms: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """Requests per second Envoy had the upstream's answer for within `threshold_ms` (an Envoy bucket bound)."""
    if threshold_ms not in ENVOY_BUCKETS_MS:
        raise ValueError(f"latency threshold {threshold_ms} ms is not one of Envoy's buckets: {ENVOY_BUCKETS_MS}")
    return _sum(by, _rq_time("bucket", window, by, models, f', le="{threshold_ms}"'))


def latency_count_rate(window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """Requests per second with a latency sample (the upstream answered)."""
    return _sum(by, _rq_time("count", window, by, models))


def latency_quantile_seconds(quantile: float, window: str, by: Sequence[str] = ("model",), models: Models = ALL) -> str:
    """The `quantile` of upstream request time, in seconds (Envoy records milliseconds)."""
    buckets = _sum((*by, "le"), _rq_time("bucket", window, by, models))
    return f"histogram_quantile(\n  {quantile},\n{indent(buckets)}\n)\n/ 1000"


# --- two scrapes of /stats/prometheus (servegrid top) ------------------------------------------


@dataclass
class VersionCounts:
    """Cumulative counts for one model version, summed over its clusters (and over Envoys)."""

    requests: float = 0.0
    server_errors: float = 0.0
    buckets_ms: dict[float, float] = field(default_factory=dict)  # upper bound (ms) -> cumulative count

    def add(self, other: VersionCounts) -> None:
        self.requests += other.requests
        self.server_errors += other.server_errors
        for bound, count in other.buckets_ms.items():
            self.buckets_ms[bound] = self.buckets_ms.get(bound, 0.0) + count

    def minus(self, earlier: VersionCounts) -> VersionCounts:
        """What happened between two scrapes (a counter that went down means Envoy restarted: start from 0)."""

        def delta(now: float, before: float) -> float:
            return now - before if now >= before else now

        return VersionCounts(
            delta(self.requests, earlier.requests),
            delta(self.server_errors, earlier.server_errors),
            {b: delta(c, earlier.buckets_ms.get(b, 0.0)) for b, c in self.buckets_ms.items()},
        )


ModelVersion = tuple[str, int]
_SERVER_CODES = frozenset(str(c) for c in SERVER_ERROR_GRPC_CODES)


# One sample line of the Prometheus text format: name, optional {labels}, value (Envoy prints no timestamps).
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    """(name, labels, value) per sample line, names exactly as exposed. Not prometheus_client's parser: it
    appends `_total` to every counter sample, which makes Envoy's `envoy_cluster_grpc` (by status) and
    `envoy_cluster_grpc_total` (all calls) one name."""
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line.strip())
        if match is None:
            continue
        labels = {k: v.replace('\\"', '"').replace("\\\\", "\\") for k, v in _LABEL.findall(match[2] or "")}
        yield match[1], labels, float(match[3])


def read_scrape(text: str) -> dict[ModelVersion, VersionCounts]:
    """Per (model, version) counts from one Envoy's /stats/prometheus text."""
    out: dict[ModelVersion, VersionCounts] = {}
    for name, labels, value in samples(text):
        if not name.startswith("envoy_cluster_"):
            continue
        parsed = parse_cluster(labels.get(CLUSTER_LABEL, ""))
        if parsed is None:
            continue
        model, version, protocol = parsed
        counts = out.setdefault((model, version), VersionCounts())
        if protocol == "grpc" and name == GRPC_TOTAL:
            counts.requests += value
        elif protocol == "grpc" and name == GRPC_BY_STATUS and labels.get(names.GRPC_STATUS_TAG) in _SERVER_CODES:
            counts.server_errors += value
        elif protocol == "http" and name == HTTP_COMPLETED:
            counts.requests += value
        elif (
            protocol == "http"
            and name == HTTP_BY_CLASS
            and labels.get("envoy_response_code_class") == SERVER_ERROR_HTTP_CLASS
        ):
            counts.server_errors += value
        elif name == f"{RQ_TIME_MS}_bucket":
            bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
            counts.buckets_ms[bound] = counts.buckets_ms.get(bound, 0.0) + value
    return out


def merge(scrapes: Iterable[Mapping[ModelVersion, VersionCounts]]) -> dict[ModelVersion, VersionCounts]:
    """Several Envoys' counts added up."""
    out: dict[ModelVersion, VersionCounts] = {}
    for scrape in scrapes:
        for key, counts in scrape.items():
            out.setdefault(key, VersionCounts()).add(counts)
    return out


def quantile_ms(quantile: float, buckets_ms: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (linear within a bucket); None without samples."""
    bounds = sorted(buckets_ms)
    if not bounds or buckets_ms[bounds[-1]] <= 0:
        return None
    rank = quantile * buckets_ms[bounds[-1]]
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets_ms[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower_bound  # in the open-ended bucket: the highest finite bound, as Prometheus does
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
