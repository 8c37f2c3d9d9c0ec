"""The model registry service: models, versions, stages, traffic policies, backends and the routing table."""
