"""Versioned SQL for the batch service's schema, applied by services.batch.store.apply_migrations."""
