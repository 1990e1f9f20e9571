"""The end-to-end LaMM experiment: pre-train on a joint mixture, then fine-tune vs train from scratch.

One call of :func:`run_experiment` (``bench/pretrain_finetune.py``) does, from a clean checkout:

1. data: the embedded demo sets (generated), 3BPA ingested from ``<shared_data>/3bpa``, and nested
   random subsets of ``<shared_data>/acac/train_300K.xyz`` (e.g. 50 ⊂ 100 ⊂ 500 structures), each
   ingested as its own dataset (``subsets.json`` records the chosen frame indices);
2. pre-training of every variant (the main one and the ablations) under the DeepSpeed launcher on
   ``ranks`` processes (``launch/pretrain.py``);
3. for every subset size: training from scratch (``launch/pretrain.py``) and fine-tuning each
   pre-trained model (``launch/finetune.py``) with one shared config, i.e. the same steps, batch,
   optimiser and evaluation, several processes at once;
4. collection: final errors on the full test sets, learning curves (``eval_curve.jsonl``), the steps
   each fine-tune needs to reach the scratch model's final force error, plots and a Markdown report.

Every run is an ordinary engine run with its own directory (config, ``metrics.jsonl``, TensorBoard
``tb/``, ``summary.json``, ``model.safetensors``, ``log.txt``); a run whose directory already holds
a finished result for the same command is not repeated, so an interrupted experiment resumes.

The package, one way of imports (config <- plan <- report <- run):

* ``config``: the typed experiment config (:class:`ExperimentConfig`, :class:`PretrainVariant`), its
  loading, paths, and :class:`ExperimentError`;
* ``plan``: the data (:func:`prepare_data`, nested acac subsets) and which runs exist, with their
  commands and dependencies (:func:`plan_runs`);
* ``report``: collecting results, curves, steps-to-target, headline figures, plots and the Markdown report;
* ``run``: executing the runs (:func:`execute`: reuse, failures, dependants, children killed on
  interrupt) and the whole experiment in one call (:func:`run_experiment`).
"""

from lamm_ds.experiments.pretrain_finetune.config import (ExperimentConfig, ExperimentError, PretrainVariant,
                                                          load_experiment_config)
from lamm_ds.experiments.pretrain_finetune.plan import ExperimentData, RunSpec, acac_subsets, plan_runs
from lamm_ds.experiments.pretrain_finetune.report import steps_to_reach
from lamm_ds.experiments.pretrain_finetune.run import execute, run_experiment

__all__ = ["ExperimentConfig", "ExperimentData", "ExperimentError", "PretrainVariant", "RunSpec", "acac_subsets",
           "execute", "load_experiment_config", "plan_runs", "run_experiment", "steps_to_reach"]
