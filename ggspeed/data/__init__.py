"""Data for ggspeed's trainer and benchmarks: the embedded corpus and indexed datasets."""
