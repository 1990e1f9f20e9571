"""Models: PaiNN backbone, dataset-aware heads, and the multi-dataset Potential."""

from lamm_ds.model.heads import (
    DatasetStats,
    DirectForceHead,
    EnergyHead,
    GatedEquivariantBlock,
    fit_dataset_stats,
    fit_element_references,
    fit_normalization,
)
from lamm_ds.model.painn import PaiNN, PaiNNConfig
from lamm_ds.model.potential import Potential

__all__ = [
    "DatasetStats",
    "DirectForceHead",
    "EnergyHead",
    "GatedEquivariantBlock",
    "PaiNN",
    "PaiNNConfig",
    "Potential",
    "fit_dataset_stats",
    "fit_element_references",
    "fit_normalization",
]
