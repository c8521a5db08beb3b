"""GPT models used by ggspeed's trainer and benchmarks."""
