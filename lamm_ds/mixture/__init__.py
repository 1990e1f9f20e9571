"""Multi-dataset mixture sampling."""

from lamm_ds.mixture.sampler import EpochView, FeistelPermutation, MixtureStream, temperature_probabilities

__all__ = ["EpochView", "FeistelPermutation", "MixtureStream", "temperature_probabilities"]
