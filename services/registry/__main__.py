"""`python -m services.registry`: run the registry with settings from the environment."""

from services.registry.server import build_app
from services.registry.settings import RegistrySettings

if __name__ == "__main__":
    build_app(RegistrySettings()).run()
