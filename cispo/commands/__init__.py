"""What the `cispo` command runs beyond training (cispo/cli.py dispatches): evaluation, the GGUF import, the
pass-rate filter and the benchmarks of a source checkout. One module per command."""
