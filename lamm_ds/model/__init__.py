"""Models: PaiNN (LaMM-S) and EquiformerV2 (LaMM-L) backbones, fairchem's PaiNN variant (for its
checkpoints), dataset-aware heads, the multi-dataset Potential."""

from lamm_ds.model.heads import (
    DatasetStats,
    DirectForceHead,
    EnergyHead,
    GatedEquivariantBlock,
    fit_dataset_stats,
    fit_element_references,
    fit_normalization,
)
from lamm_ds.model.equiformer_v2 import PRESETS, EquiformerV2, EquiformerV2Config, EquiformerV2Potential
from lamm_ds.model.painn import PaiNN, PaiNNConfig
from lamm_ds.model.painn_fairchem import FairchemPaiNNConfig, FairchemPaiNNPotential
from lamm_ds.model.potential import Potential

__all__ = [
    "DatasetStats",
    "DirectForceHead",
    "EquiformerV2",
    "EquiformerV2Config",
    "EquiformerV2Potential",
    "EnergyHead",
    "FairchemPaiNNConfig",
    "FairchemPaiNNPotential",
    "GatedEquivariantBlock",
    "PRESETS",
    "PaiNN",
    "PaiNNConfig",
    "Potential",
    "fit_dataset_stats",
    "fit_element_references",
    "fit_normalization",
]
