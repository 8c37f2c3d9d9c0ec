"""Run the edge service: `python -m services.edge` (settings from SERVEGRID_EDGE_* variables)."""

from services.edge.server import build_app
from services.edge.settings import EdgeSettings

build_app(EdgeSettings()).run()
