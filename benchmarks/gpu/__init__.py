"""The GPU benchmark's parts; ``benchmarks/gpu_bench.py`` is its command."""
