"""The shipped Grafana dashboards are well-formed: unique ids, panels that do not overlap, queries on the
Prometheus data-source variable, and only variables the dashboard defines. (Whether each query has data is
tests/integration/test_observability.py's job, against a real Prometheus.)"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "observability" / "dashboards").glob("*.json"))
GRAFANA_VARIABLES = {"__rate_interval", "__interval", "__range"}


def _load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def test_the_five_dashboards_ship() -> None:
    assert [p.stem for p in DASHBOARDS] == [
        "servegrid-batch",
        "servegrid-canary",
        "servegrid-edge",
        "servegrid-mesh",
        "servegrid-triton",
    ]
    uids = [_load(p)["uid"] for p in DASHBOARDS]
    assert uids == [p.stem for p in DASHBOARDS]


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_a_dashboard_is_well_formed(path: Path) -> None:
    dashboard = _load(path)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        mine = {
            (x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        cells |= mine
    defined = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in defined
    queries = [t for p in panels if p["type"] != "row" for t in p["targets"]]
    assert queries
    for panel in (p for p in panels if p["type"] != "row"):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["title"] and panel["targets"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", target["expr"]))  # not label_replace's $1
            assert used <= defined | GRAFANA_VARIABLES, (
                f"{panel['title']}: undefined {used - defined - GRAFANA_VARIABLES}"
            )
