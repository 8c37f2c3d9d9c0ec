"""`servegrid top`'s arithmetic on two recorded scrapes of Envoy's /stats/prometheus (the shape Envoy 1.40 prints,
with the grpc_stats filter and the grpc_status tag of services/mesh/bootstrap.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from services.cli.top import Row, render, rows_between, stats_url
from services.mesh import stats

BUCKETS = ("0.5", "1", "5", "10", "25", "+Inf")


def _histogram(cluster: str, cumulative: tuple[int, ...]) -> str:
    lines = [
        f'envoy_cluster_upstream_rq_time_bucket{{envoy_cluster_name="{cluster}",le="{le}"}} {count}'
        for le, count in zip(BUCKETS, cumulative, strict=True)
    ]
    return "\n".join(
        [*lines, f'envoy_cluster_upstream_rq_time_count{{envoy_cluster_name="{cluster}"}} {cumulative[-1]}']
    )


# t = 0 s
BEFORE = f"""# TYPE envoy_cluster_grpc counter
envoy_cluster_grpc{{envoy_cluster_name="kserve|affine|v1|grpc",grpc_status="0"}} 90
envoy_cluster_grpc{{envoy_cluster_name="kserve|affine|v1|grpc",grpc_status="3"}} 10
envoy_cluster_grpc{{envoy_cluster_name="kserve|digits|v1|grpc",grpc_status="0"}} 10
envoy_cluster_grpc{{envoy_cluster_name="gateway",grpc_status="14"}} 7
# TYPE envoy_cluster_grpc_total counter
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|affine|v1|grpc"}} 100
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|digits|v1|grpc"}} 10
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|server|grpc"}} 40
envoy_cluster_grpc_total{{envoy_cluster_name="gateway"}} 70
# TYPE envoy_cluster_upstream_rq_completed counter
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|affine|v1|grpc"}} 100
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|affine|v1|http"}} 50
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|digits|v1|grpc"}} 10
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="kserve|affine|v1|grpc"}} 100
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="kserve|affine|v1|http"}} 50
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",envoy_cluster_name="kserve|affine|v1|http"}} 0
# TYPE envoy_cluster_upstream_rq_time histogram
{_histogram("kserve|affine|v1|grpc", (10, 50, 90, 100, 100, 100))}
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix="public"}} 150
"""

# t = 10 s: affine answered 100 more gRPC calls (5 UNAVAILABLE, 5 INVALID_ARGUMENT) and 50 REST ones; digits v2
# appeared between the scrapes (a canary) with 2 INTERNAL and one REST 503.
AFTER = f"""# TYPE envoy_cluster_grpc counter
envoy_cluster_grpc{{envoy_cluster_name="kserve|affine|v1|grpc",grpc_status="0"}} 180
envoy_cluster_grpc{{envoy_cluster_name="kserve|affine|v1|grpc",grpc_status="3"}} 15
envoy_cluster_grpc{{envoy_cluster_name="kserve|affine|v1|grpc",grpc_status="14"}} 5
envoy_cluster_grpc{{envoy_cluster_name="kserve|digits|v1|grpc",grpc_status="0"}} 30
envoy_cluster_grpc{{envoy_cluster_name="kserve|digits|v2|grpc",grpc_status="0"}} 18
envoy_cluster_grpc{{envoy_cluster_name="kserve|digits|v2|grpc",grpc_status="13"}} 2
envoy_cluster_grpc{{envoy_cluster_name="gateway",grpc_status="14"}} 9
# TYPE envoy_cluster_grpc_total counter
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|affine|v1|grpc"}} 200
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|digits|v1|grpc"}} 30
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|digits|v2|grpc"}} 20
envoy_cluster_grpc_total{{envoy_cluster_name="kserve|server|grpc"}} 60
envoy_cluster_grpc_total{{envoy_cluster_name="gateway"}} 90
# TYPE envoy_cluster_upstream_rq_completed counter
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|affine|v1|grpc"}} 200
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|affine|v1|http"}} 100
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|digits|v1|grpc"}} 30
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|digits|v2|grpc"}} 20
envoy_cluster_upstream_rq_completed{{envoy_cluster_name="kserve|digits|v2|http"}} 10
# TYPE envoy_cluster_upstream_rq_xx counter
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="kserve|affine|v1|grpc"}} 200
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="kserve|affine|v1|http"}} 100
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",envoy_cluster_name="kserve|affine|v1|http"}} 0
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="2",envoy_cluster_name="kserve|digits|v2|http"}} 9
envoy_cluster_upstream_rq_xx{{envoy_response_code_class="5",envoy_cluster_name="kserve|digits|v2|http"}} 1
# TYPE envoy_cluster_upstream_rq_time histogram
{_histogram("kserve|affine|v1|grpc", (20, 120, 190, 200, 200, 200))}
# TYPE envoy_http_downstream_rq_total counter
envoy_http_downstream_rq_total{{envoy_http_conn_manager_prefix="public"}} 330
"""


def _rows(by_version: bool = False) -> dict[tuple[str, int | None], Row]:
    rows = rows_between(stats.read_scrape(BEFORE), stats.read_scrape(AFTER), 10.0, by_version)
    return {(r.model, r.version): r for r in rows}


def test_rates_and_server_error_ratio_per_model() -> None:
    rows = _rows()
    assert set(rows) == {("affine", None), ("digits", None)}  # not the server cluster, not the gateway
    affine = rows["affine", None]
    # 100 gRPC + 50 REST in 10 s; only UNAVAILABLE is the server's fault, INVALID_ARGUMENT the caller's.
    assert affine.requests_per_s == pytest.approx(15.0)
    assert affine.error_ratio == pytest.approx(5 / 150)
    digits = rows["digits", None]
    assert digits.requests_per_s == pytest.approx(5.0)
    assert digits.error_ratio == pytest.approx(3 / 50)  # 2 INTERNAL + 1 REST 503


def test_one_row_per_version_with_a_version_that_appeared_between_scrapes() -> None:
    rows = _rows(by_version=True)
    assert rows["digits", 1].requests_per_s == pytest.approx(2.0) and rows["digits", 1].error_ratio == 0
    assert rows["digits", 2].requests_per_s == pytest.approx(3.0)
    assert rows["digits", 2].error_ratio == pytest.approx(3 / 30)


def test_quantiles_interpolate_within_envoys_buckets_like_prometheus() -> None:
    affine = _rows()["affine", None]
    # Deltas: 10 under 0.5 ms, 70 under 1 ms, 100 under 5 ms (100 calls with a latency sample).
    assert affine.p50_ms == pytest.approx(0.5 + 0.5 * (50 - 10) / (70 - 10))
    assert affine.p99_ms == pytest.approx(1 + 4 * (99 - 70) / (100 - 70))
    assert _rows()["digits", None].p50_ms is None  # no latency samples in the interval: no figure


def test_an_envoy_that_restarted_between_scrapes_counts_from_zero() -> None:
    rows = rows_between(stats.read_scrape(AFTER), stats.read_scrape(BEFORE), 10.0)
    affine = next(r for r in rows if r.model == "affine")
    assert affine.requests_per_s == pytest.approx(15.0)  # everything since the restart


def test_several_envoys_add_up() -> None:
    both = stats.merge([stats.read_scrape(AFTER), stats.read_scrape(AFTER)])
    before = stats.merge([stats.read_scrape(BEFORE), stats.read_scrape(BEFORE)])
    affine = next(r for r in rows_between(before, both, 10.0) if r.model == "affine")
    assert affine.requests_per_s == pytest.approx(30.0) and affine.error_ratio == pytest.approx(5 / 150)


def test_the_table_shows_what_an_operator_reads() -> None:
    console = Console(width=120, record=True)
    console.print(render(list(_rows().values()), "http://127.0.0.1:9901/stats/prometheus", 10.0, False))
    text = console.export_text()
    affine = next(line for line in text.splitlines() if "affine" in line)
    assert "15.0" in affine and "3.33%" in affine and "0.83 ms" in affine and "4.87 ms" in affine
    console = Console(width=120, record=True)
    console.print(render([], "x", 2.0, False))
    assert "no model traffic seen yet" in console.export_text()


def test_an_admin_address_becomes_its_stats_url() -> None:
    assert stats_url("127.0.0.1:9901") == "http://127.0.0.1:9901/stats/prometheus"
    assert stats_url("http://envoy:9901/") == "http://envoy:9901/stats/prometheus"
    assert stats_url("http://envoy:9901/stats/prometheus") == "http://envoy:9901/stats/prometheus"
