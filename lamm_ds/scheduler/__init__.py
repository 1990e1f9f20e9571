"""Load-balanced data parallelism: a calibrated atoms+edges cost model and a deterministic scheduler
that turns windows of the mixture stream into per-rank micro-batches (docs/load_balancing.md)."""

from lamm_ds.scheduler.cost import CostModel, FitReport, fit_cost_model
from lamm_ds.scheduler.defaults import BUILTIN, builtin_cost_model
from lamm_ds.scheduler.partition import (Caps, ScheduleError, WindowPlan, next_fit_starts, plan_balanced, plan_budget,
                                         plan_max_atoms, split_atoms, split_fixed)
from lamm_ds.scheduler.plan import STRATEGIES, StepPlan, StepScheduler, rank_slice

__all__ = ["BUILTIN", "Caps", "CostModel", "FitReport", "STRATEGIES", "ScheduleError", "StepPlan", "StepScheduler",
           "WindowPlan", "builtin_cost_model", "fit_cost_model", "next_fit_starts", "plan_balanced", "plan_budget",
           "plan_max_atoms", "rank_slice", "split_atoms", "split_fixed"]
