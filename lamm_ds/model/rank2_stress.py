"""Direct (non-conservative) stress head for EquiformerV2: a symmetric 3x3 tensor from the node
features, split into its isotropic (l = 0) and anisotropic (l = 2, traceless) parts.

The design is that of fairchem's ``Rank2SymmetricTensorHead`` with ``decompose=True`` (the head of
the OMat24 / DeNS EquiformerV2 checkpoints), re-implemented so those checkpoints convert one to one
(:mod:`lamm_ds.model.convert_fairchem`). For edge e = (centre i, neighbour j, vector r_e):

* edge weights ``w_e = norm(Y(r_e))``: e3nn spherical harmonics of degrees 0..L of the *unnormalised*
  vector (so degree l grows as |r|^l), passed through the backbone's kind of equivariant norm with
  one channel;
* an invariant per edge ``h_e = LayerNorm(sum_lm w_e[lm] * [x_j | x_i][lm, :])`` (``x_i`` only with
  ``source_target=False``): the node features contracted with the edge direction;
* isotropic: ``a_i = MLP_0(mean_e h_e)``; anisotropic: ``b_i[m] = MLP_2(mean_e Yhat2_m(r_e) h_e)``
  with ``Yhat2`` the degree-2 harmonics of the unit vector (with ``edge_mlp`` the MLPs run on each
  edge before the mean over the centre's edges);
* per structure: the mean over atoms (``extensive``: the sum divided by ``avg_num_nodes``), then
  the normaliser: ``a = std_0 a + mean_0``, ``b = std_2 b``;
* ``S = a I / sqrt(3) + sum_m b_m B_m``, with ``B_m`` the orthonormal (Frobenius) symmetric traceless
  matrices whose quadratic forms ``u^T B_m u`` are proportional to e3nn's degree-2 harmonics.

Equivariance: the isotropic part (the trace) is invariant. The anisotropic part rotates as a rank-2
tensor only when ``MLP_2`` is linear without bias (``mlp_layers=1`` and a zero output bias): the
published head applies its biases and SiLU to each of the five l = 2 components separately, which
is not equivariant; it is reproduced here as it is, since converted checkpoints must predict what
fairchem predicts.

Units and sign: eV/Å^3, ASE's sign convention (positive = tensile), as fairchem's stress labels
(``atoms.get_stress(voigt=False)``) and its ASE calculator, which returns the prediction unchanged.
Structures without a periodic direction, or with a cell of volume below
:data:`lamm_ds.model.potential._MIN_VOLUME`, get exactly zero stress, as on the conservative path.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from torch import nn

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.model.numerics import PreciseBuffers
from lamm_ds.model.potential import _MIN_VOLUME
from lamm_ds.model.so3 import make_norm


def rank2_basis(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(6, 3, 3): ``I / sqrt(3)``, then the five unit symmetric traceless matrices in e3nn's
    degree-2 order (m = -2..2 with y the polar axis: xz, xy, 2yy - xx - zz, yz, zz - xx)."""
    b = torch.zeros(6, 3, 3, dtype=torch.float64)
    b[0] = torch.eye(3, dtype=torch.float64) / math.sqrt(3.0)
    x, y, z = 0, 1, 2
    r2 = 1 / math.sqrt(2.0)
    for k, (p, q) in ((1, (x, z)), (2, (x, y)), (4, (y, z))):
        b[k, p, q] = b[k, q, p] = r2
    b[3, y, y] = 2 / math.sqrt(6.0)
    b[3, x, x] = b[3, z, z] = -1 / math.sqrt(6.0)
    b[5, z, z], b[5, x, x] = r2, -r2
    return b.to(dtype)


def _mlp(width: int, layers: int) -> nn.Sequential:
    """``layers`` linear maps (width -> ... -> 1) with SiLU between them."""
    mods: list[nn.Module] = []
    for k in range(layers):
        last = k == layers - 1
        mods.append(nn.Linear(width, 1 if last else width))
        if not last:
            mods.append(nn.SiLU())
    return nn.Sequential(*mods)


def _mean_by(values: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    """Mean of the rows of ``values`` sharing ``index``; 0 for an index with no rows."""
    out = values.new_zeros((num, *values.shape[1:])).index_add_(0, index, values)
    count = torch.zeros(num, dtype=values.dtype, device=values.device).index_add_(
        0, index, torch.ones_like(index, dtype=values.dtype))
    return out / count.clamp_min(1).view(-1, *([1] * (values.dim() - 1)))


class StressNormaliser(PreciseBuffers):
    """fairchem's ``stress_isotropic`` (mean, std) and ``stress_anisotropic`` (std) normalisers,
    kept in fp32 whatever the module's dtype (in state_dict, so export keeps them)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("iso_mean", torch.tensor(0.0))
        self.register_buffer("iso_std", torch.tensor(1.0))
        self.register_buffer("aniso_std", torch.tensor(1.0))


class Rank2StressHead(nn.Module):
    """Stress (B, 3, 3) in eV/Å^3 from EquiformerV2 node features; see the module docstring.

    ``forward(x, vectors, batch)``: ``x`` (N, (L+1)^2, C) backbone output, ``vectors`` (E, 3) edge
    vectors r_ij (lamm-ds convention: from centre ``edge_index[0]`` to neighbour ``edge_index[1]``).
    """

    def __init__(self, lmax: int, channels: int, norm_type: str, source_target: bool = True,
                 mlp_layers: int = 2, edge_mlp: bool = False, extensive: bool = False,
                 avg_num_nodes: float = 1.0) -> None:
        super().__init__()
        if mlp_layers < 1:
            raise ValueError(f"stress head needs mlp_layers >= 1, got {mlp_layers}")
        if avg_num_nodes <= 0:
            raise ValueError(f"stress head avg_num_nodes must be > 0, got {avg_num_nodes}")
        self.lmax, self.source_target, self.edge_mlp = lmax, source_target, edge_mlp
        self.extensive, self.avg_num_nodes = extensive, float(avg_num_nodes)
        width = channels * (2 if source_target else 1)
        # the harmonics of |r|^l grow fast with l: normalised across degrees, as fairchem does
        self.sh_norm = make_norm(norm_type, lmax, 1)
        self.edge_norm = nn.LayerNorm(width)
        self.iso_mlp = _mlp(width, mlp_layers)
        self.aniso_mlp = _mlp(width, mlp_layers)
        self.norm = StressNormaliser()

    def forward(self, x: torch.Tensor, vectors: torch.Tensor, batch: AtomsBatch) -> torch.Tensor:
        fdtype, gdtype = x.dtype, vectors.dtype
        centre, neighbour = batch.edge_index
        n, g = batch.num_atoms, batch.num_graphs
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            geo = vectors.detach()  # a direct head: no derivative w.r.t. positions is taken through it
            sh = o3.spherical_harmonics(list(range(self.lmax + 1)), geo, normalize=False)
            y2 = o3.spherical_harmonics(2, geo, normalize=True)
        w = self.sh_norm(sh.to(fdtype).unsqueeze(-1)).squeeze(-1)                 # (E, (L+1)^2)
        # fairchem's order: message source (neighbour j) first, then target (centre i)
        feats = torch.cat([x.index_select(0, neighbour), x.index_select(0, centre)], dim=2) \
            if self.source_target else x.index_select(0, centre)
        h = self.edge_norm(torch.einsum("erc,er->ec", feats, w))                  # (E, width)
        h2 = y2.to(fdtype).unsqueeze(-1) * h.unsqueeze(1)                        # (E, 5, width)
        if self.edge_mlp:
            iso = _mean_by(self.iso_mlp(h), centre, n)
            aniso = _mean_by(self.aniso_mlp(h2), centre, n)
        else:
            iso = self.iso_mlp(_mean_by(h, centre, n))
            aniso = self.aniso_mlp(_mean_by(h2, centre, n))
        # per-structure sums, normalisers and the 3x3 assembly in the geometry dtype, outside autocast
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            iso, aniso = iso.reshape(n).to(gdtype), aniso.reshape(n, 5).to(gdtype)
            iso = torch.zeros(g, dtype=gdtype, device=x.device).index_add(0, batch.batch, iso)
            aniso = torch.zeros(g, 5, dtype=gdtype, device=x.device).index_add(0, batch.batch, aniso)
            denom = iso.new_full((g,), self.avg_num_nodes) if self.extensive else batch.natoms.to(gdtype)
            iso, aniso = iso / denom, aniso / denom.unsqueeze(1)
            iso = iso * self.norm.iso_std.to(gdtype) + self.norm.iso_mean.to(gdtype)
            aniso = aniso * self.norm.aniso_std.to(gdtype)
            parts = torch.cat([iso.unsqueeze(1), aniso], dim=1)                   # (B, 6)
            stress = torch.einsum("bk,kij->bij", parts, rank2_basis(gdtype).to(x.device))
            volume = torch.linalg.det(batch.cell.to(gdtype)).abs()
        periodic = batch.pbc.any(dim=1) & (volume > _MIN_VOLUME)
        return torch.where(periodic[:, None, None], stress, torch.zeros_like(stress))
