"""One file per op family, each defining ``OPS`` (a list of ``bench.registry.Op``); see docs/benchmarks.md."""
