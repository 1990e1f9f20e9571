"""Numerics shared by every backbone and head: force modes, the geometry dtype, buffers that keep
their precision when a module is cast to bf16/fp16."""

from __future__ import annotations

import torch
from torch import nn

FORCE_MODES = ("direct", "conservative")


#: exp(-36) ~ 2.3e-16, the fp64 epsilon: a basis value below it is set to exactly 0 (see ``gaussian``).
_GAUSSIAN_FLOOR = -36.0


def gaussian(exponent: torch.Tensor) -> torch.Tensor:
    """``exp(exponent)`` for ``exponent <= 0``, exactly 0 where it is below ``_GAUSSIAN_FLOOR``.

    The tails of a narrow Gaussian basis reach subnormal floats (below 1.2e-38 in fp32) at the far
    edges, and x86 arithmetic on subnormals is 20-40x slower: a few thousand of them in the basis
    made every matmul of the radial filter's gradient (and of the double backward for conservative
    forces) that much slower. Cutting the tail where it is below the fp64 epsilon changes no value
    that any float format can resolve next to the basis' O(1) entries.
    """
    # exp of the clamped exponent: the masked-out entries are not subnormal either, so neither the
    # forward nor the backward (d exp = exp * grad) ever touches one
    value = torch.exp(exponent.clamp_min(_GAUSSIAN_FLOOR))
    return torch.where(exponent >= _GAUSSIAN_FLOOR, value, torch.zeros((), dtype=value.dtype, device=value.device))


def geometry_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32 (fp64 stays fp64) for positions, distances and energy sums."""
    return torch.promote_types(dtype, torch.float32)


class PreciseBuffers(nn.Module):
    """Module whose floating buffers never drop below their own precision on ``.to(bf16)``/``.half()``.

    DeepSpeed's bf16 mode casts the whole module, buffers included; reference energies and scales
    must not be rounded to 8 mantissa bits. Device moves and up-casts still apply.
    """

    def _apply(self, fn, recurse=True):
        old = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for k, before in old.items():
            after = self._buffers[k]
            if after is not None and after.is_floating_point() and after.element_size() < before.element_size():
                self._buffers[k] = before.to(device=after.device)
        return self
