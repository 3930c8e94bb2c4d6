"""Experiments kept apart from the production code: variants the benchmarks measure, not used by the backend."""
