"""The gateway: servegrid's public API (real-time Infer, model discovery, batch jobs) behind Envoy."""
