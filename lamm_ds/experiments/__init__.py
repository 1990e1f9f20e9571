"""Reproducible multi-run experiments built on the engine (the last stage of the data flow)."""

from lamm_ds.experiments.pretrain_finetune import ExperimentConfig, PretrainVariant, run_experiment

__all__ = ["ExperimentConfig", "PretrainVariant", "run_experiment"]
