"""Versioned SQL migrations for the registry schema, applied in file-name order by services.registry.migrate."""
