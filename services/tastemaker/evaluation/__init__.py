"""Offline evaluation: Tastemaker's ranking against classic baselines on a user's own data.

`tastemaker eval --dataset movielens --out DIR` runs `run_evaluation`: it loads interactions and
item text (`data`), splits them by time under three protocols (`protocols`), fits every method
(`baselines` and `pipeline`, the latter being the service's own profile and ranking code), tunes
each on validation only, ranks the whole catalog for every test user, scores the rankings
(`metrics`) and writes report.json, report.md and plots (`report`). See README.md in this folder
for the method and the latest numbers.
"""

from tastemaker.evaluation.runner import EvalConfig, run_evaluation

__all__ = ["EvalConfig", "run_evaluation"]
