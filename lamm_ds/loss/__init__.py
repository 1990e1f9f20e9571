"""Training losses."""

from lamm_ds.loss.universal import (
    DATASET_METRIC_FIELDS,
    TERMS,
    LossConfig,
    local_counts,
    per_dataset_metrics,
    summarize_per_dataset,
    universal_loss,
)

__all__ = [
    "DATASET_METRIC_FIELDS",
    "TERMS",
    "LossConfig",
    "local_counts",
    "per_dataset_metrics",
    "summarize_per_dataset",
    "universal_loss",
]
