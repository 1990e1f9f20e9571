"""Chemical similarity of elements by their place in the periodic table, for fine-tuning on
elements a pre-trained model never saw: such an element's embedding rows start as the mean of its
nearest trained neighbours' rows (a trained vector in the right region of feature space instead
of a random one), and a new energy head copies the pre-trained head whose elements are closest
to the fine-tuning set's.

Distance is ``|Δgroup| + |Δperiod|``; among elements at the same distance, those of the same group
come first (chemistry is most alike down a group). Lanthanides and actinides sit in group 3.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lamm_ds.model.layers import element_tables

_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)


def table_position(z: int) -> tuple[int, int]:
    """(period, group) of atomic number ``z`` (1..118)."""
    if not 1 <= z <= 118:
        raise ValueError(f"atomic number must be in 1..118, got {z}")
    period = next(i + 1 for i, end in enumerate(_PERIOD_ENDS) if z <= end)
    first = _PERIOD_ENDS[period - 2] + 1 if period > 1 else 1
    k = z - first  # 0-based position within the period
    if period == 1:
        return 1, 1 if z == 1 else 18
    if period <= 3:
        return period, k + 1 if k < 2 else k + 11
    if period <= 5:
        return period, k + 1
    if k < 2:
        return period, k + 1
    if k < 17:  # La..Lu / Ac..Lr: the f-block, placed in group 3
        return period, 3
    return period, k - 13


def element_distance(a: int, b: int) -> int:
    (pa, ga), (pb, gb) = table_position(a), table_position(b)
    return abs(ga - gb) + abs(pa - pb)


def nearest_elements(z: int, candidates: Iterable[int]) -> list[int]:
    """The candidates most like ``z``: the smallest distance, same-group ones only if any."""
    pool = sorted({int(c) for c in candidates if int(c) != z})
    if not pool:
        return []
    group = table_position(z)[1]

    def key(c: int) -> tuple[int, bool]:
        return element_distance(z, c), table_position(c)[1] != group

    best = min(map(key, pool))
    return [c for c in pool if key(c) == best]


def composition_distance(wanted: Iterable[int], have: Iterable[int]) -> float:
    """Mean over ``wanted`` of the distance to the closest element of ``have`` (0: all covered)."""
    wanted, have = sorted(set(wanted)), sorted(set(have))
    if not wanted or not have:
        return float("inf")
    return sum(min(element_distance(w, h) for h in have) for w in wanted) / len(wanted)


def closest_head(wanted: Iterable[int], trained: dict[str, list[int]]) -> str | None:
    """The head whose training elements are closest to ``wanted`` (ties: the first listed)."""
    scored = [(composition_distance(wanted, zs), i, name) for i, (name, zs) in enumerate(trained.items()) if zs]
    return min(scored)[2] if scored else None


@torch.no_grad()
def init_new_element_rows(model: nn.Module, new: Iterable[int], trained: Iterable[int]) -> dict[int, list[int]]:
    """Set every element table's row of each ``new`` element to the mean of its nearest ``trained``
    elements' rows; returns ``{new Z: [the elements averaged]}`` (empty list: nothing to copy)."""
    trained = sorted(set(int(z) for z in trained))
    sources = {int(z): nearest_elements(int(z), trained) for z in new}
    for _, table in element_tables(model):
        for z, like in sources.items():
            if like:
                table.weight[z] = table.weight[like].mean(dim=0)
    return sources
