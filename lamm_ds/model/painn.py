"""PaiNN backbone (Schütt, Unke, Gastegger 2021, "Equivariant message passing for the prediction
of tensorial properties and molecular spectra").

Dtype policy (``lamm_ds.model.numerics``): geometry (edge vectors, distances, radial basis, cutoff)
is evaluated in at least fp32, whatever the parameter dtype; features are cast to the parameter
dtype afterwards, so a module cast to bf16 (DeepSpeed ``bf16``) still sees accurate distances.

Speed/memory: the edge part of every message block (gather, filter, product, scatter) is one
autograd Function that saves only node-sized tensors and the (E, num_rbf) basis, and recomputes the
edge-sized products in backward (edge-chunked on CPU, where large fresh allocations dominate the
cost). Its backward is written with differentiable torch ops, so double backward (conservative
forces in training) works through it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.model.numerics import FORCE_MODES, gaussian, geometry_dtype

RBF_KINDS = ("gaussian", "sinc")


@dataclass
class PaiNNConfig:
    hidden: int = 128
    layers: int = 3
    num_rbf: int = 20
    cutoff: float = 5.0            # Å; also the neighbour-list cutoff the data pipeline must use
    max_neighbors: int | None = 50
    max_neighbors_strict: bool = True  # False: fairchem's non-strict cap (ties with the (k+1)-th nearest kept)
    max_z: int = 100
    forces: str = "direct"         # "direct" (gated equivariant head) or "conservative" (-dE/dpos)
    stress: bool = False           # only with conservative forces (d E / d strain)
    rbf: str = "gaussian"          # "gaussian" (as schnetpack/fairchem configs) or "sinc" (paper)
    fused_messages: bool = True    # memory-lean fused edge op; False = plain autograd (reference)
    denoise_head: bool = False     # separate vector head for denoising labels (out["pseudo_forces"])

    def __post_init__(self) -> None:
        if self.forces not in FORCE_MODES:
            raise ValueError(f"forces must be one of {FORCE_MODES}, got {self.forces!r}")
        if self.rbf not in RBF_KINDS:
            raise ValueError(f"rbf must be one of {RBF_KINDS}, got {self.rbf!r}")
        if self.stress and self.forces != "conservative":
            raise ValueError("stress needs forces='conservative' (it is a strain derivative of the energy)")
        if self.hidden < 2 or self.layers < 1 or self.num_rbf < 2 or self.cutoff <= 0:
            raise ValueError(f"invalid PaiNN sizes: {self}")

    def to_dict(self) -> dict:
        d = asdict(self)
        # Left out while off: a model without the head exports the same metadata as before the
        # option existed, so older lamm-ds versions still read it (from_dict defaults it to False).
        if not d["denoise_head"]:
            del d["denoise_head"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PaiNNConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PaiNNConfig keys: {sorted(unknown)}")
        return cls(**d)


class RadialBasis(nn.Module):
    """Radial basis times a cosine cutoff, evaluated in the distances' dtype (no buffers to round)."""

    def __init__(self, num_rbf: int, cutoff: float, kind: str = "gaussian") -> None:
        super().__init__()
        self.num_rbf, self.cutoff, self.kind = num_rbf, float(cutoff), kind

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        rc = self.cutoff
        if self.kind == "gaussian":
            centers = torch.linspace(0.0, rc, self.num_rbf, device=r.device, dtype=r.dtype)
            coeff = -0.5 / (rc / (self.num_rbf - 1)) ** 2
            basis = gaussian(coeff * (r.unsqueeze(-1) - centers) ** 2)
        else:
            n = torch.arange(1, self.num_rbf + 1, device=r.device, dtype=r.dtype) * (math.pi / rc)
            basis = torch.sin(r.unsqueeze(-1) * n) / r.unsqueeze(-1)
        fcut = torch.where(r < rc, 0.5 * (torch.cos(r * (math.pi / rc)) + 1.0), torch.zeros_like(r))
        return basis * fcut.unsqueeze(-1)


def _chunk_size(t: torch.Tensor, width: int) -> int:
    # CPU: keep per-chunk temporaries ~1 MiB elements so they come from the allocator's free lists
    # instead of fresh (page-faulting) mappings; GPU: one chunk.
    if t.device.type == "cpu":
        return max(256, (1 << 20) // max(width, 1))
    return 1 << 62


class _EdgeMessage(torch.autograd.Function):
    """ds_i = Σ_j xs_j w_s(r_ij);  dv_i = Σ_j v_j xvv_j w_vv(r_ij) + r̂_ij xvs_j w_vs(r_ij).

    x: (N, 3H) = φ(s), split [s | vv | vs]; w = rbf @ weight.T (filter, never stored);
    v: (N, 3, H) or None (first layer, v = 0); unit: (E, 3); edges i <- j.
    """

    @staticmethod
    def forward(ctx, x, v, rbf, weight, unit, i, j):
        n, h3 = x.shape
        h = h3 // 3
        ds = x.new_zeros(n, h)
        dv = x.new_zeros(n, 3, h)
        step = _chunk_size(x, 3 * h3)
        for a in range(0, i.shape[0], step):
            ic, jc = i[a:a + step], j[a:a + step]
            xe = x.index_select(0, jc).mul_(F.linear(rbf[a:a + step], weight))
            ds.index_add_(0, ic, xe[:, :h])
            m = unit[a:a + step].unsqueeze(2) * xe[:, None, 2 * h:]
            if v is not None:
                m.addcmul_(v.index_select(0, jc), xe[:, None, h:2 * h])
            dv.index_add_(0, ic, m)
        ctx.save_for_backward(x, v, rbf, weight, unit, i, j)
        return ds, dv

    @staticmethod
    def backward(ctx, gs, gv):
        x, v, rbf, weight, unit, i, j = ctx.saved_tensors
        need_x, need_v, need_rbf, need_w, need_unit = ctx.needs_input_grad[:5]
        n, h3 = x.shape
        h = h3 // 3
        gx = torch.zeros_like(x) if need_x else None
        gvin = torch.zeros_like(v) if (need_v and v is not None) else None
        gw = None
        grbf, gunit = [], []
        step = _chunk_size(x, 3 * h3)
        for a in range(0, i.shape[0], step):
            ic, jc, rc, uc = i[a:a + step], j[a:a + step], rbf[a:a + step], unit[a:a + step]
            w = F.linear(rc, weight)
            xj = x.index_select(0, jc)
            gvi = gv.index_select(0, ic)                       # (C, 3, H)
            if need_x or need_w or need_rbf:
                parts = [gs.index_select(0, ic)]
                parts.append((gvi * v.index_select(0, jc)).sum(1) if v is not None else gs.new_zeros(gvi.shape[0], h))
                parts.append((gvi * uc.unsqueeze(2)).sum(1))
                gxe = torch.cat(parts, 1)                       # d loss / d (x_j * w), (C, 3H)
                if need_x:
                    gx.index_add_(0, jc, gxe * w)
                if need_w or need_rbf:
                    gfilt = gxe * xj
                    if need_w:
                        gwc = gfilt.t() @ rc
                        gw = gwc if gw is None else gw + gwc
                    if need_rbf:
                        grbf.append(gfilt @ weight)
            if gvin is not None:
                gvin.index_add_(0, jc, gvi * (xj[:, h:2 * h] * w[:, h:2 * h]).unsqueeze(1))
            if need_unit:
                gunit.append((gvi * (xj[:, 2 * h:] * w[:, 2 * h:]).unsqueeze(1)).sum(2))
        if need_w and gw is None:
            gw = torch.zeros_like(weight)
        grbf_t = (torch.cat(grbf) if grbf else torch.zeros_like(rbf)) if need_rbf else None
        gunit_t = (torch.cat(gunit) if gunit else torch.zeros_like(unit)) if need_unit else None
        return gx, gvin, grbf_t, gw, gunit_t, None, None


def edge_message_reference(x, v, rbf, weight, unit, i, j):
    """Plain-autograd version of ``_EdgeMessage`` (same maths), for tests and as a fallback."""
    n, h3 = x.shape
    h = h3 // 3
    xe = x.index_select(0, j) * F.linear(rbf, weight)
    ds_e, dvv, dvs = xe.split(h, dim=1)
    m = unit.unsqueeze(2) * dvs.unsqueeze(1)
    if v is not None:
        m = m + v.index_select(0, j) * dvv.unsqueeze(1)
    ds = x.new_zeros(n, h).index_add(0, i, ds_e)
    dv = x.new_zeros(n, 3, h).index_add(0, i, m)
    return ds, dv


class PaiNNMessage(nn.Module):
    def __init__(self, hidden: int, num_rbf: int, fused: bool = True) -> None:
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        # One bias-free filter for the three splits; the cutoff is already folded into the basis,
        # so filter(rbf * fcut) == filter(rbf) * fcut and the filter vanishes smoothly at the cutoff.
        self.filter = nn.Linear(num_rbf, 3 * hidden, bias=False)
        self.fused = fused

    def forward(self, s, v, rbf, unit, edge_index):
        x = self.phi(s)
        dt = x.dtype  # follows autocast too; everything entering the edge op shares it
        args = (x, None if v is None else v.to(dt), rbf.to(dt), self.filter.weight.to(dt), unit.to(dt),
                edge_index[0], edge_index[1])
        # Under torch.compile the plain form: the compiler fuses it itself, and the fused op's
        # edge-chunk loop would make it specialise (and recompile) on every new edge count.
        fused = self.fused and not torch.compiler.is_compiling()
        ds, dv = _EdgeMessage.apply(*args) if fused else edge_message_reference(*args)
        s = s + ds
        v = dv if v is None else v + dv
        return s, v


class PaiNNUpdate(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.hidden, self.eps = hidden, eps
        self.uv = nn.Linear(hidden, 2 * hidden, bias=False)  # U and V fused
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, s, v, need_vectors: bool = True):
        h = self.hidden
        u, w = self.uv(v).split(h, dim=-1)                      # (N, 3, H) each
        norm = torch.sqrt((w * w).sum(1) + self.eps)           # eps keeps d/dv finite at v = 0
        a_vv, a_sv, a_ss = self.mlp(torch.cat([s, norm], dim=-1)).split(h, dim=-1)
        s = s + a_sv * (u * w).sum(1) + a_ss
        if need_vectors:
            v = v + a_vv.unsqueeze(1) * u
        return s, v


class PaiNN(nn.Module):
    """PaiNN backbone: ``forward(batch, edge_vectors) -> (s (N, H), v (N, 3, H))`` in the parameter dtype."""

    def __init__(self, cfg: PaiNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.embedding = nn.Embedding(cfg.max_z + 1, h)
        self.radial = RadialBasis(cfg.num_rbf, cfg.cutoff, cfg.rbf)
        self.messages = nn.ModuleList(PaiNNMessage(h, cfg.num_rbf, cfg.fused_messages) for _ in range(cfg.layers))
        self.updates = nn.ModuleList(PaiNNUpdate(h) for _ in range(cfg.layers))

    def forward(self, batch: AtomsBatch, vectors: torch.Tensor, need_vectors: bool = True):
        """``vectors``: (E, 3) edge vectors r_ij (any float dtype; promoted to >= fp32 for geometry).
        ``need_vectors=False`` skips the last vector update (energy-only / conservative use)."""
        s = self.embedding(batch.z)
        fdtype = s.dtype
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            vectors = vectors.to(geometry_dtype(vectors.dtype))
            r = torch.linalg.vector_norm(vectors, dim=-1)
            unit = (vectors / r.unsqueeze(-1)).to(fdtype)
            rbf = self.radial(r).to(fdtype)
        v = None
        last = len(self.messages) - 1
        for k, (msg, upd) in enumerate(zip(self.messages, self.updates)):
            s, v = msg(s, v, rbf, unit, batch.edge_index)
            s, v = upd(s, v, need_vectors or k < last)
        return s, v
