"""EquiformerV2 (Liao, Wood, Das, Smidt 2023, "EquiformerV2: Improved Equivariant Transformer for
Scaling to Higher-Degree Representations") for lamm-ds, on e3nn's spherical-harmonic conventions.

Architecture (the published one, so fairchem checkpoints convert one-to-one, see
``lamm_ds.model.convert_fairchem``):

* node features ``(N, (L+1)^2, C)``; the l = 0 part starts from an element embedding, plus an
  edge-degree embedding (radial MLP -> m = 0 coefficients in each edge frame, rotated back, summed
  over incoming edges, divided by ``avg_degree``);
* edge scalars: 600 Gaussians on [0, cutoff] (width 2 spacings) + source/target element embeddings;
* ``num_layers`` pre-norm transformer blocks: equivariant norm -> SO(2) graph attention (rotate
  [x_src | x_dst] into the edge frame keeping |m| <= mmax, SO(2) convolution modulated by a radial
  MLP, separable S2 activation on a grid, second SO(2) convolution, attention weights from extra
  m = 0 channels: LayerNorm -> smooth leaky ReLU -> per-head dot -> softmax over incoming edges ->
  dropout; weighted values rotated back and summed) -> drop-path -> residual; norm -> feed-forward
  (degree-wise linear, grid MLP on the sphere, degree-wise linear) -> drop-path -> residual;
* final norm; energy = per-dataset feed-forward head on each atom (l = 0), summed and divided by
  ``avg_num_nodes`` ("sum") or the atom count ("mean"); forces = one more SO(2) attention block
  with one output channel whose l = 1 coefficients are the force vector (``forces="direct"``), or
  ``-dE/dpos`` (``forces="conservative"``, differentiating through the edge frames too).

Edge convention (lamm-ds): edge e goes from centre ``i = edge_index[0]`` to neighbour
``j = edge_index[1]``; the message flows j -> i, so j is the "source" and i the "target".

Speed/memory relative to the reference implementation (same maths): per-degree Wigner blocks
restricted to the kept rows instead of dense (L+1)^2 matrices, no permutation matmuls (edge
features live in m-primary order), separable grid transforms, and the per-edge S2 grids of the
attention are recomputed in backward instead of stored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lamm_ds.graphs.batch import AtomsBatch
from lamm_ds.model.heads import DatasetStats, EnergyOffset, StatsBuffers, graph_energy_offsets
from lamm_ds.model.numerics import FORCE_MODES, gaussian, geometry_dtype
from lamm_ds.model.potential import Potential
from lamm_ds.model.rank2_stress import Rank2StressHead
from lamm_ds.model.so3 import EdgeRotation, S2Grid, SO3Layout, SO3Linear, edge_frames, grid_silu, make_norm

MODEL_KIND = "equiformer_v2"

# Published sizes (fairchem configs/oc20/s2ef/{all,2M}/equiformer_v2/*.yml).
PRESETS: dict[str, dict] = {
    "31M": dict(num_layers=8, lmax=4, mmax=2, drop_path_rate=0.1),
    "83M": dict(num_layers=12, lmax=6, mmax=2, drop_path_rate=0.05),
    "153M": dict(num_layers=20, lmax=6, mmax=3, drop_path_rate=0.1),
}
_PRESET_COMMON = dict(sphere_channels=128, attn_hidden_channels=64, num_heads=8, attn_alpha_channels=64,
                      attn_value_channels=16, ffn_hidden_channels=128, edge_channels=128, grid_resolution=18,
                      cutoff=12.0, max_neighbors=20, max_z=89, alpha_drop=0.1, norm_type="layer_norm_sh",
                      use_grid_mlp=True, weight_init="uniform")
# Nominal published sizes, and the exact parameter counts of fairchem-core 1.10's EquiformerV2
# (backbone + energy head + force head) built with these configs; one-dataset presets here have
# exactly the fairchem counts (checked in tests/test_equiformer_v2.py).
PUBLISHED_PARAMS = {"31M": 31_000_000, "83M": 83_000_000, "153M": 153_000_000}
FAIRCHEM_PARAMS = {"31M": 31_058_690, "83M": 83_164_802, "153M": 153_602_690}


@dataclass
class EquiformerV2Config:
    num_layers: int = 2
    lmax: int = 2
    mmax: int = 1
    sphere_channels: int = 32
    attn_hidden_channels: int = 32
    num_heads: int = 4
    attn_alpha_channels: int = 16
    attn_value_channels: int = 8
    ffn_hidden_channels: int = 32
    edge_channels: int = 32
    grid_resolution: Optional[int] = 18   # None: the smallest grids that resolve lmax/mmax
    num_gaussians: int = 600              # edge distance basis (fixed at 600 in the reference)
    gaussian_width: float = 2.0           # in units of the Gaussian spacing
    cutoff: float = 5.0                   # Å; also the neighbour-list cutoff of the data pipeline
    max_neighbors: Optional[int] = 20
    max_neighbors_strict: bool = True     # False: fairchem's non-strict cap (ties with the (k+1)-th nearest kept)
    max_z: int = 89                       # element embeddings 0..max_z (fairchem max_num_elements - 1)
    norm_type: str = "layer_norm_sh"      # or "rms_norm_sh"
    use_grid_mlp: bool = True             # feed-forward: MLP on the grid (else separable S2 activation)
    use_atom_edge_embedding: bool = True
    alpha_drop: float = 0.1               # dropout on attention weights
    drop_path_rate: float = 0.05          # stochastic depth, per graph
    avg_degree: float = 23.395238876342773  # divides the edge-degree embedding sum
    avg_num_nodes: float = 77.81317       # energy_reduce="sum": divides the summed atom energies
    energy_reduce: str = "sum"            # "sum" (/ avg_num_nodes) or "mean" (/ number of atoms)
    weight_init: str = "uniform"          # "uniform" or "normal"
    forces: str = "direct"                # "direct" (l = 1 head) or "conservative" (-dE/dpos)
    stress: bool = False                  # conservative only: d E / d strain
    edge_roll: str = "random"             # roll of the edge frames about the edge: "random" or "fixed"
    activation_checkpoint: bool = False   # recompute each block in backward (torch.utils.checkpoint)
    grid_chunk: int = 0                   # edges per chunk of the attention's S2 grid (0: automatic)
    l0_offset: bool = False               # a learned constant added to every node's l = 0 features after the
                                          # embedding: what a fairchem DeNS backbone adds when nothing is denoised
    stress_head: bool = False             # direct rank-2 stress head (lamm_ds.model.rank2_stress; fairchem
                                          # OMat24's rank2_symmetric_head); the stress_head_* options shape it
    stress_head_source_target: bool = True   # edge features from [neighbour | centre] (False: centre only)
    stress_head_mlp_layers: int = 2       # linear layers of each of its two MLPs
    stress_head_edge_mlp: bool = False    # MLPs on each edge before the mean over a centre's edges
    stress_head_extensive: bool = False   # structure sum / stress_head_avg_num_nodes instead of the atom mean
    stress_head_avg_num_nodes: float = 1.0

    def __post_init__(self) -> None:
        if self.forces not in FORCE_MODES:
            raise ValueError(f"forces must be one of {FORCE_MODES}, got {self.forces!r}")
        if self.stress and self.forces != "conservative":
            raise ValueError("stress needs forces='conservative' (it is a strain derivative of the energy)")
        if self.stress and self.stress_head:
            raise ValueError("stress=True (strain derivative) and stress_head=True (direct head) both define "
                             "the stress: choose one")
        if self.stress_head and (self.stress_head_mlp_layers < 1 or self.stress_head_avg_num_nodes <= 0):
            raise ValueError(f"stress head needs stress_head_mlp_layers >= 1 and stress_head_avg_num_nodes > 0, "
                             f"got {self.stress_head_mlp_layers} and {self.stress_head_avg_num_nodes}")
        if not 0 <= self.mmax <= self.lmax or self.lmax < 1:
            raise ValueError(f"need 1 <= lmax and 0 <= mmax <= lmax, got lmax={self.lmax}, mmax={self.mmax}")
        if self.forces == "direct" and self.lmax < 1:
            raise ValueError("direct forces need lmax >= 1")
        if self.energy_reduce not in ("sum", "mean"):
            raise ValueError(f"energy_reduce must be 'sum' or 'mean', got {self.energy_reduce!r}")
        if self.norm_type not in ("layer_norm_sh", "rms_norm_sh"):
            raise ValueError(f"norm_type must be 'layer_norm_sh' or 'rms_norm_sh', got {self.norm_type!r}")
        if self.edge_roll not in ("random", "fixed"):
            raise ValueError(f"edge_roll must be 'random' or 'fixed', got {self.edge_roll!r}")
        if self.weight_init not in ("uniform", "normal"):
            raise ValueError(f"weight_init must be 'uniform' or 'normal', got {self.weight_init!r}")
        if min(self.num_layers, self.sphere_channels, self.attn_hidden_channels, self.num_heads,
               self.attn_alpha_channels, self.attn_value_channels, self.ffn_hidden_channels,
               self.edge_channels, self.num_gaussians - 1) < 1 or self.cutoff <= 0:
            raise ValueError(f"invalid EquiformerV2 sizes: {self}")

    @property
    def hidden(self) -> int:  # used by generic code that sizes things by the scalar width
        return self.sphere_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        if not d["l0_offset"]:  # left out while off: files stay readable by lamm-ds versions before it
            del d["l0_offset"]
        if not d["stress_head"]:  # likewise, with the options that only shape the head
            for key in [k for k in d if k.startswith("stress_head")]:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EquiformerV2Config":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EquiformerV2Config keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "EquiformerV2Config":
        """The published 31M / 83M / 153M OC20 configurations (``overrides`` replace fields)."""
        if name not in PRESETS:
            raise KeyError(f"unknown EquiformerV2 preset {name!r}; known: {sorted(PRESETS)}")
        return cls(**{**_PRESET_COMMON, **PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------------------
# small pieces


def gaussian_basis(r: torch.Tensor, cutoff: float, num: int, width: float) -> torch.Tensor:
    """exp(-(r - mu_k)^2 / (2 (width * spacing)^2)), mu_k = linspace(0, cutoff, num); in r's dtype."""
    mu = torch.linspace(0.0, cutoff, num, dtype=torch.float64)
    coeff = -0.5 / (width * float(mu[1] - mu[0])) ** 2
    return gaussian(coeff * (r.unsqueeze(-1) - mu.to(device=r.device, dtype=r.dtype)) ** 2)


class RadialMLP(nn.Module):
    """Linear -> LayerNorm -> SiLU -> ... -> Linear, on invariant edge features."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for k in range(1, len(channels)):
            layers.append(nn.Linear(channels[k - 1], channels[k]))
            if k < len(channels) - 1:
                layers += [nn.LayerNorm(channels[k]), nn.SiLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def smooth_leaky_relu(x: torch.Tensor, slope: float = 0.2) -> torch.Tensor:
    return 0.5 * (1 + slope) * x + 0.5 * (1 - slope) * x * (2 * torch.sigmoid(x) - 1)


def segment_softmax(a: torch.Tensor, index: torch.Tensor, num: int) -> torch.Tensor:
    """Softmax of rows of ``a`` (E, H) over the edges sharing ``index``."""
    idx = index.unsqueeze(1).expand_as(a)
    amax = a.new_full((num, a.shape[1]), float("-inf")).scatter_reduce(0, idx, a.detach(), "amax")
    e = (a - amax.index_select(0, index)).exp()
    s = a.new_zeros(num, a.shape[1]).index_add_(0, index, e)
    return e / (s.index_select(0, index) + 1e-16)


def graph_drop_path(x: torch.Tensor, batch: torch.Tensor, num_graphs: int, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per graph: a dropped graph's branch output is zeroed, kept ones scaled 1/(1-p)."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = torch.floor(keep + torch.rand(num_graphs, dtype=x.dtype, device=x.device)) / keep
    return x * mask.index_select(0, batch).view(-1, *([1] * (x.dim() - 1)))


@dataclass
class EdgeContext:
    """Per-forward edge data shared by all blocks and the force head."""
    z: torch.Tensor          # (N,) atomic numbers
    basis: torch.Tensor      # (E, num_gaussians) in the feature dtype
    src: torch.Tensor        # (E,) message source (neighbour j)
    dst: torch.Tensor        # (E,) message target (centre i)
    rot: EdgeRotation
    num_nodes: int


# ------------------------------------------------------------------------------------------------
# SO(2) convolution, attention, feed-forward


class _OrderConv(nn.Module):
    """Weights of the SO(2) convolution for one order m > 0 (acts on the (+m, -m) pair as a complex number)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, 2 * out_features, bias=False)
        with torch.no_grad():
            self.fc.weight.mul_(1 / math.sqrt(2))


class SO2Convolution(nn.Module):
    """Linear maps in the edge frame, one per order m (each mixing all degrees l >= m and channels),
    optionally modulated element-wise by a radial MLP of the edge scalars. Input/output are
    m-primary (E, R, C); ``extra_m0`` additional invariant outputs are returned separately."""

    def __init__(self, layout: SO3Layout, in_ch: int, out_ch: int, rad_channels: list[int] | None,
                 extra_m0: int = 0) -> None:
        super().__init__()
        self.layout, self.in_ch, self.out_ch, self.extra_m0 = layout, in_ch, out_ch, extra_m0
        L = layout.lmax
        self.fc_m0 = nn.Linear((L + 1) * in_ch, (L + 1) * out_ch + extra_m0)
        self.so2_m_conv = nn.ModuleList(_OrderConv((L + 1 - m) * in_ch, (L + 1 - m) * out_ch)
                                        for m in range(1, layout.mmax + 1))
        self.rad_func = None
        if rad_channels is not None:
            total = (L + 1) * in_ch + sum((L + 1 - m) * in_ch for m in range(1, layout.mmax + 1))
            self.rad_func = RadialMLP([*rad_channels, total])

    def forward(self, x: torch.Tensor, edge_scalars: torch.Tensor | None):
        # One split per tensor instead of slices: the backward of a split is one cat of the
        # pieces' gradients, that of each slice a zero-filled copy of the whole edge tensor.
        e = x.shape[0]
        L = self.layout.lmax
        orders = range(1, self.layout.mmax + 1)
        x_m = x.split([L + 1] + [self.layout.m_slices[m][1] for m in orders], dim=1)
        rad = None
        if self.rad_func is not None:
            rad = self.rad_func(edge_scalars).split(
                [(L + 1) * self.in_ch] + [self.layout.m_slices[m][1] // 2 * self.in_ch for m in orders], dim=1)
        x0 = x_m[0].reshape(e, (L + 1) * self.in_ch)
        if rad is not None:
            x0 = x0 * rad[0]
        y0 = self.fc_m0(x0)
        extra, y0 = y0.split([self.extra_m0, y0.shape[1] - self.extra_m0], dim=1)
        extra = extra if self.extra_m0 else None
        outs = [y0.reshape(e, L + 1, self.out_ch)]
        for m, conv in zip(orders, self.so2_m_conv):
            n = self.layout.m_slices[m][1] // 2
            xm = x_m[m].reshape(e, 2, n * self.in_ch)  # (+m rows | -m rows)
            if rad is not None:
                xm = xm * rad[m].unsqueeze(1)
            re, im = conv.fc(xm).split(n * self.out_ch, dim=-1)
            re_plus, re_minus = re.unbind(1)
            im_plus, im_minus = im.unbind(1)
            outs.append(torch.stack([re_plus - im_minus, re_minus + im_plus], dim=1).reshape(e, 2 * n, self.out_ch))
        return torch.cat(outs, dim=1), extra


class SO2GraphAttention(nn.Module):
    """EquiformerV2's equivariant graph attention with separable S2 activation (output: node features)."""

    def __init__(self, cfg: EquiformerV2Config, layout: SO3Layout, edge_grid: S2Grid, out_ch: int,
                 alpha_drop: float) -> None:
        super().__init__()
        self.layout, self.edge_grid, self.cfg = layout, edge_grid, cfg
        c, h = cfg.sphere_channels, cfg.attn_hidden_channels
        self.heads, self.alpha_ch, self.value_ch = cfg.num_heads, cfg.attn_alpha_channels, cfg.attn_value_channels
        rad = [cfg.num_gaussians, cfg.edge_channels, cfg.edge_channels]
        if cfg.use_atom_edge_embedding:
            self.source_embedding = nn.Embedding(cfg.max_z + 1, cfg.edge_channels)
            self.target_embedding = nn.Embedding(cfg.max_z + 1, cfg.edge_channels)
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
            rad[0] += 2 * cfg.edge_channels
        self.so2_conv_1 = SO2Convolution(layout, 2 * c, h, rad, extra_m0=self.heads * self.alpha_ch + h)
        self.alpha_norm = nn.LayerNorm(self.alpha_ch)
        self.alpha_dot = nn.Parameter(torch.empty(self.heads, self.alpha_ch).uniform_(
            -1 / math.sqrt(self.alpha_ch), 1 / math.sqrt(self.alpha_ch)))
        self.alpha_dropout = nn.Dropout(alpha_drop) if alpha_drop > 0 else None
        self.so2_conv_2 = SO2Convolution(layout, h, self.heads * self.value_ch, None)
        self.proj = SO3Linear(self.heads * self.value_ch, out_ch, layout.lmax)

    def forward(self, x: torch.Tensor, ctx: EdgeContext) -> torch.Tensor:
        scalars = ctx.basis
        if self.cfg.use_atom_edge_embedding:
            scalars = torch.cat([scalars, self.source_embedding(ctx.z.index_select(0, ctx.src)),
                                 self.target_embedding(ctx.z.index_select(0, ctx.dst))], dim=1)
        msg = ctx.rot.to_edge(x, ctx.src, ctx.dst)                       # (E, R, 2C)
        msg, extra = self.so2_conv_1(msg, scalars)
        na = self.heads * self.alpha_ch
        alpha_in, gate = extra[:, :na], extra[:, na:]
        act = grid_silu(msg, self.edge_grid, self.cfg.grid_chunk)
        msg = torch.cat([F.silu(gate).unsqueeze(1), act[:, 1:]], dim=1)
        msg, _ = self.so2_conv_2(msg, None)
        a = smooth_leaky_relu(self.alpha_norm(alpha_in.reshape(alpha_in.shape[0], self.heads, self.alpha_ch)))
        alpha = segment_softmax(torch.einsum("ehk,hk->eh", a, self.alpha_dot), ctx.dst, ctx.num_nodes)
        if self.alpha_dropout is not None:
            alpha = self.alpha_dropout(alpha)
        e, r, _ = msg.shape
        msg = (msg.reshape(e, r, self.heads, self.value_ch) * alpha[:, None, :, None]).reshape(e, r, self.heads * self.value_ch)
        out = ctx.rot.from_edge_sum(msg, ctx.dst, ctx.num_nodes)
        return self.proj(out)


class FeedForward(nn.Module):
    """Degree-wise linear -> (grid MLP on the sphere | separable S2 activation) -> degree-wise linear."""

    def __init__(self, cfg: EquiformerV2Config, node_grid: S2Grid, in_ch: int, hidden: int, out_ch: int) -> None:
        super().__init__()
        self.grid, self.use_grid_mlp = node_grid, cfg.use_grid_mlp
        L = cfg.lmax
        self.so3_linear_1 = SO3Linear(in_ch, hidden, L)
        if cfg.use_grid_mlp:
            self.scalar_mlp = nn.Sequential(nn.Linear(in_ch, hidden), nn.SiLU())
            self.grid_mlp = nn.Sequential(nn.Linear(hidden, hidden, bias=False), nn.SiLU(),
                                          nn.Linear(hidden, hidden, bias=False), nn.SiLU(),
                                          nn.Linear(hidden, hidden, bias=False))
        else:
            self.gating_linear = nn.Linear(in_ch, hidden)
        self.so3_linear_2 = SO3Linear(hidden, out_ch, L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_grid_mlp:
            gate = self.scalar_mlp(x[:, :1])
            h = self.so3_linear_1(x)
            h = self.grid.from_grid(self.grid_mlp(self.grid.to_grid(h)))
        else:
            gate = F.silu(self.gating_linear(x[:, :1]))
            h = grid_silu(self.so3_linear_1(x), self.grid)
        return self.so3_linear_2(torch.cat([gate, h[:, 1:]], dim=1))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: EquiformerV2Config, layout: SO3Layout, edge_grid: S2Grid, node_grid: S2Grid) -> None:
        super().__init__()
        c = cfg.sphere_channels
        self.drop_path = cfg.drop_path_rate
        self.norm_1 = make_norm(cfg.norm_type, cfg.lmax, c)
        self.ga = SO2GraphAttention(cfg, layout, edge_grid, c, cfg.alpha_drop)
        self.norm_2 = make_norm(cfg.norm_type, cfg.lmax, c)
        self.ffn = FeedForward(cfg, node_grid, c, cfg.ffn_hidden_channels, c)

    def forward(self, x: torch.Tensor, ctx: EdgeContext, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        h = self.ga(self.norm_1(x), ctx)
        x = x + graph_drop_path(h, batch, num_graphs, self.drop_path, self.training)
        h = self.ffn(self.norm_2(x))
        return x + graph_drop_path(h, batch, num_graphs, self.drop_path, self.training)


class EdgeDegreeEmbedding(nn.Module):
    def __init__(self, cfg: EquiformerV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        rad = [cfg.num_gaussians, cfg.edge_channels, cfg.edge_channels]
        if cfg.use_atom_edge_embedding:
            self.source_embedding = nn.Embedding(cfg.max_z + 1, cfg.edge_channels)
            self.target_embedding = nn.Embedding(cfg.max_z + 1, cfg.edge_channels)
            nn.init.uniform_(self.source_embedding.weight, -0.001, 0.001)
            nn.init.uniform_(self.target_embedding.weight, -0.001, 0.001)
            rad[0] += 2 * cfg.edge_channels
        self.rad_func = RadialMLP([*rad, (cfg.lmax + 1) * cfg.sphere_channels])

    def forward(self, ctx: EdgeContext) -> torch.Tensor:
        scalars = ctx.basis
        if self.cfg.use_atom_edge_embedding:
            scalars = torch.cat([scalars, self.source_embedding(ctx.z.index_select(0, ctx.src)),
                                 self.target_embedding(ctx.z.index_select(0, ctx.dst))], dim=1)
        y0 = self.rad_func(scalars).reshape(scalars.shape[0], self.cfg.lmax + 1, self.cfg.sphere_channels)
        return ctx.rot.m0_from_edge_sum(y0, ctx.dst, ctx.num_nodes) / self.cfg.avg_degree


def _edge_grid_res(cfg: EquiformerV2Config, lmax: int, mmax: int) -> tuple[int, int]:
    if cfg.grid_resolution is not None:
        return cfg.grid_resolution, cfg.grid_resolution
    return 2 * (lmax + 1), (2 * (mmax + 1) + 1 if lmax == mmax else 2 * mmax + 1)


class EquiformerV2(nn.Module):
    """Backbone: ``forward(batch, vectors) -> (x (N, (L+1)^2, C), EdgeContext)`` in the parameter dtype."""

    def __init__(self, cfg: EquiformerV2Config) -> None:
        super().__init__()
        self.cfg = cfg
        L, M = cfg.lmax, cfg.mmax
        self.layout = SO3Layout(L, M)
        self.edge_grid = S2Grid(self.layout.m_order, L, M, _edge_grid_res(cfg, L, M))
        node_coeffs = [(l, m) for l in range(L + 1) for m in range(-l, l + 1)]
        self.node_grid = S2Grid(node_coeffs, L, L, _edge_grid_res(cfg, L, L))
        self.sphere_embedding = nn.Embedding(cfg.max_z + 1, cfg.sphere_channels)
        self.edge_degree_embedding = EdgeDegreeEmbedding(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, self.layout, self.edge_grid, self.node_grid)
                                    for _ in range(cfg.num_layers))
        self.norm = make_norm(cfg.norm_type, L, cfg.sphere_channels)
        init_weights(self, cfg.weight_init)
        if cfg.l0_offset:
            self.l0_offset = nn.Parameter(torch.zeros(cfg.sphere_channels))

    def edge_context(self, batch: AtomsBatch, vectors: torch.Tensor, differentiable_frames: bool) -> EdgeContext:
        fdtype = self.sphere_embedding.weight.dtype
        with torch.autocast(device_type=vectors.device.type, enabled=False):
            vectors = vectors.to(geometry_dtype(vectors.dtype))
            r = torch.linalg.vector_norm(vectors, dim=-1)
            basis = gaussian_basis(r, self.cfg.cutoff, self.cfg.num_gaussians, self.cfg.gaussian_width).to(fdtype)
            frames = edge_frames(vectors if differentiable_frames else vectors.detach(), self.cfg.edge_roll)
            rot = EdgeRotation(self.layout, frames, fdtype)
        return EdgeContext(batch.z, basis, batch.edge_index[1], batch.edge_index[0], rot, batch.num_atoms)

    def forward(self, batch: AtomsBatch, vectors: torch.Tensor, differentiable_frames: bool = False):
        ctx = self.edge_context(batch, vectors, differentiable_frames)
        emb = self.sphere_embedding(batch.z)
        if self.cfg.l0_offset:
            emb = emb + self.l0_offset
        x = torch.cat([emb.unsqueeze(1), emb.new_zeros(emb.shape[0], self.layout.num_full - 1, emb.shape[1])], 1)
        x = x + self.edge_degree_embedding(ctx)
        for block in self.blocks:
            if self.cfg.activation_checkpoint and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, ctx, batch.batch, batch.num_graphs, use_reentrant=False)
            else:
                x = block(x, ctx, batch.batch, batch.num_graphs)
        return self.norm(x), ctx


def init_weights(module: nn.Module, kind: str) -> None:
    """Initialisation as in the reference: zero biases, unit LayerNorms; "normal": N(0, 1/fan_in)
    for linear layers outside the radial MLPs; radial MLPs uniform(+-1/sqrt(fan_in))."""
    radial = set()
    for m in module.modules():
        if isinstance(m, RadialMLP):
            for lin in m.modules():
                if isinstance(lin, nn.Linear):
                    radial.add(id(lin))
                    nn.init.uniform_(lin.weight, -1 / math.sqrt(lin.in_features), 1 / math.sqrt(lin.in_features))
                    nn.init.zeros_(lin.bias)
    for m in module.modules():
        if isinstance(m, (nn.Linear, SO3Linear)) and id(m) not in radial:
            if m.bias is not None:
                nn.init.zeros_(m.bias)
            if kind == "normal":
                nn.init.normal_(m.weight, 0.0, 1 / math.sqrt(m.in_features))
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# heads and the multi-dataset potential



class EqV2EnergyHead(nn.Module):
    """Per-dataset head: feed-forward block -> l = 0 -> per-atom energy (normalised units, before
    the 1/avg_num_nodes or 1/natoms reduction); holds the dataset stats and a per-structure offset."""

    def __init__(self, cfg: EquiformerV2Config, node_grid: S2Grid, stats: DatasetStats, offset: float = 0.0) -> None:
        super().__init__()
        self.energy_block = FeedForward(cfg, node_grid, cfg.sphere_channels, cfg.ffn_hidden_channels, 1)
        self.stats = StatsBuffers(stats, cfg.max_z)
        self.offset = EnergyOffset(offset)
        init_weights(self.energy_block, cfg.weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy_block(x)[:, 0, 0]


class EqV2ForceHead(nn.Module):
    """Direct forces: an SO(2) attention block with one output channel; its l = 1 part is (Fx, Fy, Fz)."""

    def __init__(self, cfg: EquiformerV2Config, layout: SO3Layout, edge_grid: S2Grid) -> None:
        super().__init__()
        self.force_block = SO2GraphAttention(cfg, layout, edge_grid, 1, alpha_drop=0.0)
        init_weights(self.force_block, cfg.weight_init)

    def forward(self, x: torch.Tensor, ctx: EdgeContext) -> torch.Tensor:
        return self.force_block(x, ctx)[:, 1:4, 0]


class EquiformerV2Potential(Potential):
    """The :class:`~lamm_ds.model.potential.Potential` contract (per-dataset energy heads, stats
    buffers, output keys energy/forces/stress/energy_scale/force_scale) on an EquiformerV2 backbone.

    Energy of graph g from dataset k: ``E = sum_i (std_k e_i / D + mean_k + ref_k[Z_i]) + offset_k``
    with D = ``avg_num_nodes`` ("sum") or the graph's atom count ("mean"). With ``cfg.stress_head``
    a shared direct rank-2 head (:mod:`lamm_ds.model.rank2_stress`) adds ``stress``.
    """

    model_kind = MODEL_KIND

    def __init__(self, cfg: EquiformerV2Config, dataset_names: list[str],
                 stats: dict[str, DatasetStats] | None = None) -> None:
        nn.Module.__init__(self)
        if not dataset_names:
            raise ValueError("at least one dataset name is required")
        self.cfg = cfg
        self.backbone = EquiformerV2(cfg)
        self.heads = nn.ModuleDict()
        self.force_head = (EqV2ForceHead(cfg, self.backbone.layout, self.backbone.edge_grid)
                           if cfg.forces == "direct" else None)
        self.denoise_head = None  # the separate denoising head is a PaiNN option (PaiNNConfig.denoise_head)
        if cfg.stress_head:  # built only when on: the parameters (and the RNG draws) are unchanged otherwise
            self.stress_head = Rank2StressHead(
                cfg.lmax, cfg.sphere_channels, cfg.norm_type, cfg.stress_head_source_target,
                cfg.stress_head_mlp_layers, cfg.stress_head_edge_mlp, cfg.stress_head_extensive,
                cfg.stress_head_avg_num_nodes)
            init_weights(self.stress_head, cfg.weight_init)
        else:
            self.stress_head = None
        self._add_initial_heads(dataset_names, stats)

    def add_dataset(self, name: str, stats: DatasetStats | None = None, init_from: str | None = None,
                    offset: float = 0.0) -> int:
        head = EqV2EnergyHead(self.cfg, self.backbone.node_grid, stats or DatasetStats.identity(self.cfg.max_z), offset)
        return self._install_head(name, head, init_from, "energy_block")

    def forward(self, batch: AtomsBatch, return_features: bool = False) -> dict[str, torch.Tensor]:
        """Potential's forward; with ``cfg.stress_head`` also ``stress`` (B, 3, 3) from the direct head
        (eV/Å^3, ASE sign; zero for graphs without a periodic cell)."""
        if self.stress_head is None:
            return super().forward(batch, return_features)
        # the node features come back as an output (detached when grad is off, as every output)
        out = super().forward(batch, return_features=True)
        x = out["node_features"] if return_features else out.pop("node_features")
        gdtype = geometry_dtype(batch.pos.dtype)
        with torch.autocast(device_type=batch.pos.device.type, enabled=False):
            vectors = batch.edge_vectors(batch.pos.to(gdtype), batch.cell.to(gdtype))
        out["stress"] = self.stress_head(x, vectors, batch)
        return out

    # the rest of forward() is Potential's; these are the EquiformerV2-specific steps.

    def _features(self, batch: AtomsBatch, vectors: torch.Tensor, conservative: bool, return_features: bool):
        return self.backbone(batch, vectors, differentiable_frames=conservative)

    def _normalised_atom_energy(self, feats, batch: AtomsBatch, atom_ds: torch.Tensor, gdtype) -> torch.Tensor:
        e_norm = self._atom_energy_norm(feats[0], atom_ds).to(gdtype)
        if self.cfg.energy_reduce == "sum":
            return e_norm / self.cfg.avg_num_nodes
        return e_norm / batch.natoms.to(gdtype).index_select(0, batch.batch)

    def _graph_energy_offset(self, batch: AtomsBatch, gdtype) -> torch.Tensor:
        return graph_energy_offsets(self.heads, batch.dataset_id, gdtype)

    def _direct_forces(self, feats) -> torch.Tensor:
        return self.force_head(*feats)

    def _feature_outputs(self, feats) -> dict[str, torch.Tensor]:
        return {"node_features": feats[0]}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
