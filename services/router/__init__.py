"""The router: KServe v2 data plane in front of Triton backends, with balancing, health, retries, canary and shadow."""
