"""`python -m services.stack up|down|status|logs` — the same commands as `servegrid`, without the entry point."""

from services.cli.main import app

app()
