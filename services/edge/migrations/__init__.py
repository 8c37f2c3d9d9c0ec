"""Versioned SQL for the edge service's schema (API keys), applied by services.runtime.migrations."""
