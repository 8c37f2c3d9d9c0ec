"""Run the router: `python -m services.router` (settings from SERVEGRID_ROUTER_* variables)."""

from services.router.server import build_app
from services.router.settings import RouterSettings

if __name__ == "__main__":
    build_app(RouterSettings()).run()
