"""Versioned SQL for the batch service's schema, applied by services.runtime.migrations."""
