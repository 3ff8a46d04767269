"""flashops microbenchmarks: ``python -m bench`` checks every op against its reference and times it against
its peers on the device at hand. See docs/benchmarks.md; op families add ``bench/cases/<family>.py``."""
