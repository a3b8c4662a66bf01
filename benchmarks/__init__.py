"""Throughput and overhead measurements of the pipeline (`make bench`, `python -m benchmarks.run`)."""
