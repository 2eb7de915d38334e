"""Choosing what to keep under both budgets: the ILP over weights (with per-layer floors),
the two-budget knapsack over channel units, and the allocation of per-layer densities
from error curves (with uniform and outlier-weighted baselines)."""
