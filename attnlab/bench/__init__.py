"""Benchmarks: speed, memory and scaling; MQAR recall; the results store and the report."""
