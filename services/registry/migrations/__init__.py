"""Versioned SQL for the registry schema, applied in file-name order by services.runtime.migrations."""
