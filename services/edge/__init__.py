"""The edge service: Envoy's rate limit service and API-key ext_authz, plus the front-door config renderer."""
