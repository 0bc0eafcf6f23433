"""Pieces of the chaos soak (``benchmarks/chaos_soak.py``): services, the supervised fleet, faults, checks."""
