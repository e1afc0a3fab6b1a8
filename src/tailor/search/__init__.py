"""Search: one architecture per (superclass, budget) scenario from the trained supernet.

Methods: the EAS architecture generator (`generator`), and the baselines it must beat on the same
supernet and scenarios - `random`, OFA's predictor-driven `evolution` (OFA-V, OFA-T, with EAT-NAS
transfer seeding) and SCARLET's constrained weighted `nsga2`. Stage entry points are in `run`.
"""
from tailor.search.common import (Evaluator, Scenario, SearchError, Snapper, check_budget, make_cost_model,
                                  params_cost_model, perturb, resolve_budgets, scenario_grid)
from tailor.search.generator import ArchGenerator, decode, gumbel_sigmoid_st, load_generator, propose
from tailor.search.run import METHODS, collect, find_arch, run_predictor, run_search

__all__ = ["ArchGenerator", "Evaluator", "METHODS", "Scenario", "SearchError", "Snapper", "check_budget", "collect",
           "decode", "find_arch", "gumbel_sigmoid_st", "load_generator", "make_cost_model", "params_cost_model",
           "perturb", "propose", "resolve_budgets", "run_predictor", "run_search", "scenario_grid"]
