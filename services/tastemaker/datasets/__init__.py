"""Data sets used by the demo and the tests; see `tastemaker.datasets.movielens`."""
