"""Batch inference: jobs in PostgreSQL, relayed through Kafka to a worker pool that calls the data plane (Envoy)."""
