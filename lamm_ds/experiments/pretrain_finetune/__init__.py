"""The end-to-end LaMM experiment: pre-train on a joint mixture, then fine-tune vs train from scratch.

One call of :func:`run_experiment` (``bench/pretrain_finetune.py``) does, from a clean checkout:

1. data: the pre-training sets, either the embedded demo sets (generated) and 3BPA ingested from
   ``<shared_data>/3bpa``, or a generated corpus (``corpus:``, :func:`lamm_ds.corpus.make_corpus`);
   and for every fine-tuning target nested random subsets of its training file (e.g. acac
   50 ⊂ 100 ⊂ 500 structures), each ingested as its own dataset, with its test sets (files under
   ``shared_data``, optionally a hold-out of the training file); the chosen frames are recorded;
2. pre-training of every variant (the main one and the ablations), once per pre-training seed, under
   the DeepSpeed launcher on ``ranks`` processes (``launch/pretrain.py``);
3. for every target, size and fine-tuning seed: training from scratch (``launch/pretrain.py``) and
   fine-tuning each pre-trained model (``launch/finetune.py``) with one shared config, i.e. the same
   steps, batch, optimiser and evaluation, several processes at once;
4. collection: final errors on the full test sets, learning curves (``eval_curve.jsonl``), the steps
   each fine-tune needs to reach the scratch model's final force error, paired differences over the
   seeds with 95% intervals, rankings, plots and a Markdown report.

The acac-only configs (``configs/experiments/pretrain_finetune*.yaml``) keep their run names and
commands; ``configs/experiments/lamm_mini.yaml`` uses seeds, two targets and the corpus.

Every run is an ordinary engine run with its own directory (config, ``metrics.jsonl``, TensorBoard
``tb/``, ``summary.json``, ``model.safetensors``, ``log.txt``); a run whose directory already holds
a finished result for the same command is not repeated, so an interrupted experiment resumes.

The package, one way of imports (config <- plan <- stats, plots <- report <- run):

* ``config``: the typed experiment config (:class:`ExperimentConfig`, :class:`PretrainVariant`,
  :class:`FinetuneTarget`, :class:`CorpusConfig`), its loading, paths, and :class:`ExperimentError`;
* ``plan``: the data (:func:`prepare_data`, :func:`planned_data`, nested subsets) and which runs
  exist, with their commands and dependencies (:func:`plan_runs`);
* ``stats``: paired differences with Student-t intervals, rankings, steps-to-reach summaries;
* ``plots``: learning curves, mean over the seeds with a min–max band;
* ``report``: collecting results, curves, steps-to-target, headline figures and the Markdown report;
* ``run``: executing the runs (:func:`execute`: reuse, failures, dependants, children killed on
  interrupt) and the whole experiment in one call (:func:`run_experiment`).
"""

from lamm_ds.experiments.pretrain_finetune.config import (CorpusConfig, ExperimentConfig, ExperimentError,
                                                          FinetuneTarget, PretrainVariant, load_experiment_config)
from lamm_ds.experiments.pretrain_finetune.plan import (ExperimentData, RunSpec, acac_subsets, nested_subsets,
                                                        plan_runs, planned_data)
from lamm_ds.experiments.pretrain_finetune.report import steps_to_reach
from lamm_ds.experiments.pretrain_finetune.run import execute, run_experiment

__all__ = ["CorpusConfig", "ExperimentConfig", "ExperimentData", "ExperimentError", "FinetuneTarget",
           "PretrainVariant", "RunSpec", "acac_subsets", "execute", "load_experiment_config", "nested_subsets",
           "plan_runs", "planned_data", "run_experiment", "steps_to_reach"]
