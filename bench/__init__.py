"""Benchmarks: a reusable KServe v2 load generator and the baselines every servegrid hop is measured against."""
