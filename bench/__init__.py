"""gatefleet's benchmarks: `python -m bench` from the repository root (see bench/README.md)."""
