"""Benchmarks of simcse-dist. Run each as a module from the repository root, e.g.
`python -m bench.throughput`; what they share is in bench/common.py."""
