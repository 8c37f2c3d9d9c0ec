"""Run the gateway: `python -m services.gateway` (settings from SERVEGRID_GATEWAY_* variables)."""

from services.gateway.server import build_app
from services.gateway.settings import GatewaySettings

build_app(GatewaySettings()).run()
