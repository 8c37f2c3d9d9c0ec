"""`python -m services.batch`: run the batch service (and its in-process workers) until SIGTERM."""

from services.batch.server import build_app
from services.batch.settings import BatchSettings

if __name__ == "__main__":
    build_app(BatchSettings()).run()
