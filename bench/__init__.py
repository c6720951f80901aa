"""Benchmarks: LAPE throughput now; latency, throughput, memory and quality reports as they land."""
