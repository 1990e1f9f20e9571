"""PaiNN as fairchem-core 1.x builds it, so that its checkpoints (e.g. OC20 ``painn_h512``) keep
predicting what they predicted (``lamm_ds.model.convert_fairchem_painn``).

Same model family as :mod:`lamm_ds.model.painn` (Schütt, Unke, Gastegger 2021), but fairchem's
variant differs in ways that change every number, so it is its own model kind (``painn_fairchem``):

* radial basis: Gaussians on ``d / cutoff`` (centres 0..1) times a polynomial envelope
  (GemNet's, exponent p: ``1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2)``);
* message block: a LayerNorm before the scalar MLP (hidden -> hidden -> 3 hidden, SiLU scaled by
  1/0.6), a filter *with* bias, the vector-to-vector part scaled by 1/sqrt(3) and every vector
  message by 1/sqrt(hidden); after it the scalars are divided by sqrt(2);
* update block: the scalar update ``(a + b <u, w> / sqrt(hidden)) / sqrt(2)`` and a fitted
  per-layer scale factor on the scalars afterwards (fairchem's ``ScaleFactor``; 1 when unfitted);
* edges: fairchem keeps one direction of every capped neighbour pair and mirrors it
  (``symmetrize_edges``): an edge j -> i survives when j < i (or, for an atom's own image, when
  the image shift is lexicographically negative), and its reverse is added. With a binding
  ``max_neighbors`` cap this graph differs from the capped one, so the backbone applies the same
  rule to whatever graph it is given;
* heads: energy MLP hidden -> hidden/2 -> 1 with scaled SiLU; direct forces from two gated
  equivariant blocks in fairchem's form (gate from the norm of a separate vector projection).

Energies of dataset k: ``E = sum_i (std_k e_i + mean_k + ref_k[Z_i]) + offset_k``; a converted
checkpoint has mean_k = 0 and its energy normaliser's mean in ``offset_k`` (per structure, as
fairchem adds it). Geometry is evaluated in at least fp32, as in :mod:`lamm_ds.model.painn`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.model.heads import DatasetStats, EnergyOffset, StatsBuffers, graph_energy_offsets
from lamm_ds.model.numerics import FORCE_MODES, PreciseBuffers, gaussian, geometry_dtype
from lamm_ds.model.potential import Potential

MODEL_KIND = "painn_fairchem"
_SILU_SCALE = 1.0 / 0.6  # fairchem's ScaledSiLU: unit variance of SiLU's output on unit normal input


@dataclass
class FairchemPaiNNConfig:
    hidden: int = 512
    layers: int = 6
    num_rbf: int = 128
    cutoff: float = 12.0               # Å; also the neighbour-list cutoff of the data pipeline
    max_neighbors: int | None = 50
    max_neighbors_strict: bool = True  # False: fairchem's non-strict cap (ties with the (k+1)-th nearest kept)
    max_z: int = 83                    # fairchem num_elements: atomic numbers 1..max_z
    envelope_exponent: int = 5         # polynomial envelope of the radial basis
    forces: str = "direct"             # "direct" (gated equivariant head) or "conservative" (-dE/dpos)
    stress: bool = False               # only with conservative forces (d E / d strain)
    denoise_head: bool = False         # not available for this kind (kept for the Potential contract)

    def __post_init__(self) -> None:
        if self.forces not in FORCE_MODES:
            raise ValueError(f"forces must be one of {FORCE_MODES}, got {self.forces!r}")
        if self.stress and self.forces != "conservative":
            raise ValueError("stress needs forces='conservative' (it is a strain derivative of the energy)")
        if self.denoise_head:
            raise ValueError("painn_fairchem has no separate denoising head (use model_kind=painn for one)")
        if self.hidden < 2 or self.layers < 1 or self.num_rbf < 2 or self.cutoff <= 0 or self.envelope_exponent < 1:
            raise ValueError(f"invalid fairchem PaiNN sizes: {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        del d["denoise_head"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FairchemPaiNNConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown FairchemPaiNNConfig keys: {sorted(unknown)}")
        return cls(**d)


class ScaledSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x) * _SILU_SCALE


class EnvelopedGaussians(PreciseBuffers):
    """``num_rbf`` Gaussians on the scaled distance ``d / cutoff`` times the polynomial envelope."""

    def __init__(self, num_rbf: int, cutoff: float, exponent: int) -> None:
        super().__init__()
        self.num_rbf, self.cutoff, self.p = num_rbf, float(cutoff), float(exponent)
        # fairchem's models are built in fp32: centres and width carry fp32 rounding, kept here
        # (also when evaluated in fp64) so that fp64 parity checks compare like with like
        centres = torch.linspace(0.0, 1.0, num_rbf, dtype=torch.float32)
        self.coeff = -0.5 / float(centres[1] - centres[0]) ** 2
        self.register_buffer("centres", centres, persistent=False)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = r * (1.0 / self.cutoff)
        p = self.p
        envelope = (1 - (p + 1) * (p + 2) / 2 * x ** p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2))
        envelope = torch.where(x < 1, envelope, torch.zeros_like(x))
        centres = self.centres.to(r.dtype)
        return envelope.unsqueeze(-1) * gaussian(self.coeff * (x.unsqueeze(-1) - centres) ** 2)


def mirrored_half(edge_index: torch.Tensor, shifts: torch.Tensor, vectors: torch.Tensor):
    """fairchem PaiNN's edge set: of every edge i <- j keep those with j < i, or j == i and a
    lexicographically negative image shift, and add each kept edge's reverse.

    ``edge_index`` (2, E) holds centres i in row 0 and neighbours j in row 1; ``vectors`` (E, 3)
    are r_ij. Returns the new (edge_index, vectors); reversed edges get -r_ij.
    """
    i, j = edge_index
    s0, s1, s2 = shifts[:, 0], shifts[:, 1], shifts[:, 2]
    earlier = (s0 < 0) | ((s0 == 0) & (s1 < 0)) | ((s0 == 0) & (s1 == 0) & (s2 < 0))
    keep = (j < i) | ((j == i) & earlier)
    ki, kj = i[keep], j[keep]
    both = torch.stack([torch.cat([ki, kj]), torch.cat([kj, ki])])
    kept = vectors[keep]
    return both, torch.cat([kept, -kept])


class FairchemMessage(nn.Module):
    def __init__(self, hidden: int, num_rbf: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.x_layernorm = nn.LayerNorm(hidden)
        self.x_proj = nn.Sequential(nn.Linear(hidden, hidden), ScaledSiLU(), nn.Linear(hidden, 3 * hidden))
        self.rbf_proj = nn.Linear(num_rbf, 3 * hidden)

    def forward(self, s, v, rbf, unit, edge_index):
        h = self.hidden
        i, j = edge_index
        xe = self.x_proj(self.x_layernorm(s)).index_select(0, j) * self.rbf_proj(rbf)
        ds_e, dvv, dvs = xe.split(h, dim=-1)
        m = v.index_select(0, j) * (dvv / math.sqrt(3.0)).unsqueeze(1) + dvs.unsqueeze(1) * unit.unsqueeze(2)
        ds = s.new_zeros(s.shape).index_add(0, i, ds_e)
        dv = v.new_zeros(v.shape).index_add(0, i, m / math.sqrt(h))
        return ds, dv


class FairchemUpdate(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.vec_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.xvec_proj = nn.Sequential(nn.Linear(2 * hidden, hidden), ScaledSiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, s, v):
        h = self.hidden
        u, w = self.vec_proj(v).split(h, dim=-1)
        dot = (u * w).sum(1) / math.sqrt(h)
        norm = torch.sqrt((w * w).sum(1) + 1e-8)     # eps keeps d/dv finite at v = 0 (as fairchem)
        a, b, c = self.xvec_proj(torch.cat([s, norm], dim=-1)).split(h, dim=-1)
        return (a + b * dot) / math.sqrt(2.0), c.unsqueeze(1) * u


class LayerScales(PreciseBuffers):
    """fairchem's fitted per-layer scale factors of the updated scalars (fp32 under bf16 casts)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(layers))


class FairchemPaiNN(nn.Module):
    """``forward(batch, edge_vectors) -> (s (N, H), v (N, 3, H))`` in the parameter dtype."""

    def __init__(self, cfg: FairchemPaiNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.embedding = nn.Embedding(cfg.max_z + 1, h)   # row Z (fairchem's row Z - 1)
        self.radial = EnvelopedGaussians(cfg.num_rbf, cfg.cutoff, cfg.envelope_exponent)
        self.messages = nn.ModuleList(FairchemMessage(h, cfg.num_rbf) for _ in range(cfg.layers))
        self.updates = nn.ModuleList(FairchemUpdate(h) for _ in range(cfg.layers))
        self.scales = LayerScales(cfg.layers)

    def forward(self, batch: AtomsBatch, vectors: torch.Tensor):
        s = self.embedding(batch.z)
        fdtype = s.dtype
        edge_index, vectors = mirrored_half(batch.edge_index, batch.shifts, vectors)
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            vectors = vectors.to(geometry_dtype(vectors.dtype))
            r = torch.linalg.vector_norm(vectors, dim=-1)
            unit = (vectors / r.unsqueeze(-1)).to(fdtype)
            rbf = self.radial(r).to(fdtype)
        v = s.new_zeros(s.shape[0], 3, s.shape[1])
        for k, (msg, upd) in enumerate(zip(self.messages, self.updates)):
            ds, dv = msg(s, v, rbf, unit, edge_index)
            s, v = (s + ds) / math.sqrt(2.0), v + dv
            ds, dv = upd(s, v)
            s, v = (s + ds) * self.scales.scale[k].to(fdtype), v + dv
        return s, v


class FairchemEnergyHead(nn.Module):
    """Per-dataset MLP (hidden -> hidden/2 -> 1, scaled SiLU), the dataset stats and a per-structure offset."""

    def __init__(self, hidden: int, stats: DatasetStats, max_z: int, offset: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden // 2), ScaledSiLU(), nn.Linear(hidden // 2, 1))
        self.stats = StatsBuffers(stats, max_z)
        self.offset = EnergyOffset(offset)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.mlp(s).squeeze(-1)



class FairchemGatedBlock(nn.Module):
    """Gated equivariant block in fairchem's form: the scalar MLP sees the norm of one vector
    projection, its second half gates another; the scalars always leave through a scaled SiLU."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.vec1_proj = nn.Linear(in_dim, in_dim, bias=False)
        self.vec2_proj = nn.Linear(in_dim, out_dim, bias=False)
        self.update_net = nn.Sequential(nn.Linear(2 * in_dim, in_dim), ScaledSiLU(), nn.Linear(in_dim, 2 * out_dim))

    def forward(self, s, v):
        norm = torch.linalg.vector_norm(self.vec1_proj(v), dim=1)
        s_out, gate = self.update_net(torch.cat([s, norm], dim=-1)).split(self.out_dim, dim=-1)
        return F.silu(s_out) * _SILU_SCALE, gate.unsqueeze(1) * self.vec2_proj(v)


class FairchemForceHead(nn.Module):
    """Direct forces (N, 3) in normalised units from two gated blocks (hidden -> hidden/2 -> 1)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.output_network = nn.ModuleList([FairchemGatedBlock(hidden, hidden // 2), FairchemGatedBlock(hidden // 2, 1)])

    def forward(self, s, v):
        for block in self.output_network:
            s, v = block(s, v)
        return v.squeeze(-1)


class FairchemPaiNNPotential(Potential):
    """The :class:`~lamm_ds.model.potential.Potential` contract on fairchem's PaiNN."""

    model_kind = MODEL_KIND

    def __init__(self, cfg: FairchemPaiNNConfig, dataset_names: list[str],
                 stats: dict[str, DatasetStats] | None = None) -> None:
        nn.Module.__init__(self)
        if not dataset_names:
            raise ValueError("at least one dataset name is required")
        self.cfg = cfg
        self.backbone = FairchemPaiNN(cfg)
        self.heads = nn.ModuleDict()
        self.force_head = FairchemForceHead(cfg.hidden) if cfg.forces == "direct" else None
        self.denoise_head = None
        self._add_initial_heads(dataset_names, stats)

    def add_dataset(self, name: str, stats: DatasetStats | None = None, init_from: str | None = None,
                    offset: float = 0.0) -> int:
        head = FairchemEnergyHead(self.cfg.hidden, stats or DatasetStats.identity(self.cfg.max_z), self.cfg.max_z,
                                  offset)
        return self._install_head(name, head, init_from, "mlp")

    def _features(self, batch: AtomsBatch, vectors: torch.Tensor, conservative: bool, return_features: bool):
        return self.backbone(batch, vectors)

    def _graph_energy_offset(self, batch: AtomsBatch, gdtype) -> torch.Tensor:
        return graph_energy_offsets(self.heads, batch.dataset_id, gdtype)
