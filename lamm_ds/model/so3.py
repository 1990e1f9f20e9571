"""SO(3) building blocks for EquiformerV2: coefficient layouts, edge frames, Wigner-D blocks, S2 grids.

Conventions (all from e3nn, so the real spherical-harmonic basis is e3nn's):

* A node feature is ``(N, (L+1)^2, C)`` in *l-primary* order: index ``l*l + l + m`` for
  ``m = -l..l``. For ``l = 1`` the three components are (x, y, z), i.e. ``D^1(R) = R``.
* e3nn's polar axis is ``y``: a rotation about ``y`` by ``t`` mixes the pair (m, -m) only.
  An *edge frame* is a rotation ``R_e`` taking the edge direction to ``+y``; in that frame the
  SO(2) convolutions act on each order ``m`` separately.
* Edge-frame features keep only ``|m| <= mmax`` and use the *m-primary* order: all ``m = 0``
  coefficients (l = 0..L), then ``+1`` (l = 1..L), ``-1`` (l = 1..L), ``+2``, ``-2``, ...
  Each order is a contiguous slice, so the SO(2) convolutions need no reshuffling.

Wigner-D blocks are built from the 3x3 frame by the Clebsch-Gordan recursion
``D^l = Q_l^T (D^{l-1} (x) D^1) Q_l`` with ``Q_l`` from ``e3nn.o3.wigner_3j``: no Euler angles, so
no singular derivatives, which keeps conservative forces (gradients through the frames) finite.
Only the rows with ``|m| <= mmax`` are ever used.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from lamm_ds.model.numerics import PreciseBuffers

# ------------------------------------------------------------------------------------------------
# coefficient layouts


class SO3Layout:
    """Index tables for degree ``lmax`` features truncated to ``|m| <= mmax`` in the edge frame."""

    def __init__(self, lmax: int, mmax: int) -> None:
        if lmax < 0 or not 0 <= mmax <= lmax:
            raise ValueError(f"need 0 <= mmax <= lmax, got lmax={lmax}, mmax={mmax}")
        self.lmax, self.mmax = lmax, mmax
        self.num_full = (lmax + 1) ** 2
        # m-primary edge-frame order: (l, m) pairs
        order = [(l, 0) for l in range(lmax + 1)]
        self.m_slices = {0: (0, lmax + 1)}
        for m in range(1, mmax + 1):
            start = len(order)
            order += [(l, m) for l in range(m, lmax + 1)]
            order += [(l, -m) for l in range(m, lmax + 1)]
            self.m_slices[m] = (start, len(order) - start)  # (start, 2 * number of degrees)
        self.m_order = order
        self.num_reduced = len(order)
        # per-degree rows kept in the edge frame: m = -k..k with k = min(l, mmax)
        self.rows = [min(l, mmax) for l in range(lmax + 1)]
        lprimary = [(l, m) for l in range(lmax + 1) for m in range(-self.rows[l], self.rows[l] + 1)]
        pos = {lm: i for i, lm in enumerate(order)}
        # m-primary position of each l-primary reduced coefficient, and the inverse
        self.l_to_m = [pos[lm] for lm in lprimary]
        inv = [0] * len(order)
        for i, p in enumerate(self.l_to_m):
            inv[p] = i
        self.m_to_l = inv
        # sqrt((2l+1)/(2 mmax+1)) for l > mmax (EquiformerV2's compensation of the m truncation)
        self.inv_scale = [math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0 for l in range(lmax + 1)]

    @staticmethod
    def full_index(l: int, m: int) -> int:
        return l * l + l + m


# ------------------------------------------------------------------------------------------------
# edge frames and Wigner-D blocks


def edge_frames(vec: torch.Tensor, roll: str = "random", generator: torch.Generator | None = None) -> torch.Tensor:
    """(E, 3, 3) rotations ``R_e`` with ``R_e @ (vec_e / |vec_e|) = +y``.

    The roll about the edge axis comes from a helper vector: uniform random in the unit cube
    centred at 0 (``roll="random"``, one draw of ``torch.rand`` of shape (E, 3) from the global or
    given generator; the same draw EquiformerV2 makes), or a fixed vector (``"fixed"``). If the
    helper is nearly parallel to the edge, one of two 90-degree turns of it is used instead.
    Differentiable w.r.t. ``vec`` (the helper is a constant).
    """
    dist = torch.linalg.vector_norm(vec, dim=1, keepdim=True)
    ex = vec / dist
    if roll == "random":
        helper = torch.rand(vec.shape, dtype=vec.dtype, device=vec.device, generator=generator) - 0.5
    elif roll == "fixed":
        helper = vec.new_tensor([0.3141, -0.5927, 0.2653]).expand_as(vec)
    else:
        raise ValueError(f"roll must be 'random' or 'fixed', got {roll!r}")
    helper = helper / torch.linalg.vector_norm(helper, dim=1, keepdim=True)
    turn_xy = torch.stack([-helper[:, 1], helper[:, 0], helper[:, 2]], dim=1)
    turn_yz = torch.stack([helper[:, 0], -helper[:, 2], helper[:, 1]], dim=1)

    def overlap(v):
        return (v * ex).sum(1, keepdim=True).abs()

    helper = torch.where(overlap(helper) > overlap(turn_xy), turn_xy, helper)
    helper = torch.where(overlap(helper) > overlap(turn_yz), turn_yz, helper)
    ez = torch.linalg.cross(ex, helper, dim=1)
    ez = ez / torch.linalg.vector_norm(ez, dim=1, keepdim=True)
    ey = torch.linalg.cross(ex, ez, dim=1)
    ey = ey / torch.linalg.vector_norm(ey, dim=1, keepdim=True)
    return torch.stack([ez, ex, -ey], dim=1)  # rows


@contextlib.contextmanager
def float64_default():
    """e3nn builds some constants in the default dtype whatever ``dtype`` says: compute them in fp64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@functools.lru_cache(maxsize=None)
def _intertwiner(l: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Orthonormal map from degree ``l`` into (l-1) x 1, as a (2l-1, 3, 2l+1) tensor (e3nn basis)."""
    from e3nn import o3

    with float64_default():
        q = o3.wigner_3j(l - 1, 1, l, dtype=torch.float64, device="cpu") * math.sqrt(2 * l + 1)
    return q.to(dtype=dtype, device=device)


def wigner_blocks(frames: torch.Tensor, lmax: int) -> list[torch.Tensor]:
    """Full Wigner-D blocks ``D^l(R_e)``, l = 0..lmax, each (E, 2l+1, 2l+1), in the frames' dtype."""
    e = frames.shape[0]
    blocks = [frames.new_ones(e, 1, 1)]
    if lmax >= 1:
        blocks.append(frames)
    for l in range(2, lmax + 1):
        q = _intertwiner(l, frames.dtype, str(frames.device))          # (a, j, k): a in 2l-1, j in 3
        prev = blocks[-1]
        # T[e, a', j', k] = sum_{a, j} prev[e, a', a] R[e, j', j] q[a, j, k]
        s = torch.einsum("ejJ,aJk->eajk", frames, q)                 # (E, 2l-1, 3, 2l+1)
        t = torch.bmm(prev, s.reshape(e, 2 * l - 1, 3 * (2 * l + 1)))  # (E, 2l-1, 3(2l+1))
        t = t.reshape(e, 3 * (2 * l - 1), 2 * l + 1)
        blocks.append(torch.matmul(q.reshape(3 * (2 * l - 1), 2 * l + 1).t(), t))
    return blocks


class _PermuteRows(torch.autograd.Function):
    """``x.index_select(1, perm)`` for a permutation, whose gradient is the inverse permutation.

    Autograd's index_select backward zero-fills a tensor the size of ``x`` and scatters into it;
    for a permutation one gather with the inverse does the same, with no fill and no scatter.
    Differentiable to any order (the backward is this function again).
    """

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(perm, inverse)
        return x.index_select(1, perm)

    @staticmethod
    def backward(ctx, grad):
        perm, inverse = ctx.saved_tensors
        return _PermuteRows.apply(grad, inverse, perm), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Rows (dim 1) of ``x`` reordered by the permutation ``perm``; ``inverse`` is its inverse."""
    return _PermuteRows.apply(x, perm, inverse)


class EdgeRotation:
    """Per-degree Wigner rows of the edge frames, and the rotations in and out of the edge frame.

    ``rows[l]``: (E, 2k+1, 2l+1), the rows ``|m| <= k = min(l, mmax)`` of ``D^l(R_e)``.
    """

    def __init__(self, layout: SO3Layout, frames: torch.Tensor, dtype: torch.dtype) -> None:
        self.layout = layout
        full = wigner_blocks(frames, layout.lmax)
        self.rows = []
        for l, d in enumerate(full):
            k = layout.rows[l]
            self.rows.append(d[:, l - k:l + k + 1, :].to(dtype))
        self._l_to_m = None
        self._m_to_l = None

    def _perm(self, device):
        if self._l_to_m is None:
            self._l_to_m = torch.tensor(self.layout.l_to_m, device=device)
            self._m_to_l = torch.tensor(self.layout.m_to_l, device=device)
        return self._l_to_m, self._m_to_l

    def to_edge(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """Gather [x_src | x_dst] per edge and rotate into the edge frame: (E, R, 2C), m-primary."""
        parts = []
        for d, xl in zip(self.rows, x.split(_degree_sizes(self.layout.lmax), dim=1)):
            g = torch.cat([xl.index_select(0, src), xl.index_select(0, dst)], dim=2)
            parts.append(torch.bmm(d, g))
        lprim = torch.cat(parts, dim=1)
        l_to_m, m_to_l = self._perm(x.device)
        return permute_rows(lprim, m_to_l, l_to_m)

    def from_edge_sum(self, y: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """Rotate m-primary edge-frame features (E, R, C) back and sum them onto ``dst``: (N, (L+1)^2, C)."""
        l_to_m, m_to_l = self._perm(y.device)
        y = permute_rows(y, l_to_m, m_to_l)  # l-primary reduced
        out = []
        for l, (d, yl) in enumerate(zip(self.rows, y.split([d.shape[1] for d in self.rows], dim=1))):
            scale = self.layout.inv_scale[l]
            dt = d.transpose(1, 2)
            if scale != 1.0:
                dt = dt * scale
            msg = torch.bmm(dt, yl)
            out.append(y.new_zeros(num_nodes, 2 * l + 1, y.shape[2]).index_add_(0, dst, msg))
        return torch.cat(out, dim=1)

    def m0_from_edge_sum(self, y0: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """Like :meth:`from_edge_sum` for features with only m = 0 coefficients, y0: (E, L+1, C)."""
        out = []
        for l, d in enumerate(self.rows):
            k = self.layout.rows[l]
            col = d[:, k, :] * self.layout.inv_scale[l]      # (E, 2l+1): row m=0 of D = column of D^T
            msg = col.unsqueeze(2) * y0[:, l:l + 1, :]
            out.append(y0.new_zeros(num_nodes, 2 * l + 1, y0.shape[2]).index_add_(0, dst, msg))
        return torch.cat(out, dim=1)


# ------------------------------------------------------------------------------------------------
# S2 grids


class S2Grid(PreciseBuffers):
    """Transforms between spherical-harmonic coefficients and a (long x lat) grid on the sphere.

    ``coeffs`` lists the (l, m) of the feature rows, in any order. The transform is e3nn's
    ``ToS2Grid``/``FromS2Grid`` ("component" normalisation), with degrees l > ``mmax`` rescaled by
    sqrt((2l+1)/(2 mmax+1)) as EquiformerV2 does for m-truncated features. It is applied separably:
    a latitude GEMM per order m (one batched matmul over the orders, coefficients padded to the
    largest group), then one longitude GEMM, in a coefficient-major layout; that is 2-3x fewer
    flops than a dense (lat*long x coeffs) product for the grids EquiformerV2 uses.
    Matrices are non-persistent buffers (not in the state dict). Grids are (A, B, Z, C).
    """

    def __init__(self, coeffs: list[tuple[int, int]], lmax: int, mmax: int, res: tuple[int, int]) -> None:
        super().__init__()
        from e3nn.o3 import FromS2Grid, ToS2Grid

        res_lat, res_long = res
        with float64_default():
            to = ToS2Grid(lmax, (res_lat, res_long), normalization="component", dtype=torch.float64, device="cpu")
            fr = FromS2Grid((res_lat, res_long), lmax, normalization="component", dtype=torch.float64, device="cpu")
        groups: dict[int, list[int]] = {}
        for i, (_, m) in enumerate(coeffs):
            groups.setdefault(m, []).append(i)
        ms = list(groups)
        width = max(len(v) for v in groups.values())
        self.num_m, self.width, self.res_lat, self.res_long = len(ms), width, res_lat, res_long
        to_b = torch.zeros(len(ms), res_lat, width, dtype=torch.float64)
        from_b = torch.zeros(len(ms), width, res_lat, dtype=torch.float64)
        pad_idx = [0] * (len(ms) * width)       # padded slot -> feature row (dummy slots: row 0, weight 0)
        unpad_idx = [0] * len(coeffs)           # feature row -> padded slot
        for g, m in enumerate(ms):
            for k, i in enumerate(groups[m]):
                l = coeffs[i][0]
                s = math.sqrt((2 * l + 1) / (2 * mmax + 1)) if l > mmax else 1.0
                full = l * l + l + m
                to_b[g, :, k] = to.shb[m + lmax, :, full] * s
                from_b[g, k, :] = fr.shb[m + lmax, :, full] * s
                pad_idx[g * width + k] = i
                unpad_idx[i] = g * width + k
        idx = torch.tensor([m + lmax for m in ms])
        # kept in fp64 whatever the model's dtype (PreciseBuffers) and cast at use: an fp64 model then
        # computes with fp64 constants, not fp32-rounded ones, whose 1e-8 errors break the symmetry
        # of ideal crystals (zero l > 0 features) enough for the norms to amplify into real forces
        self.register_buffer("to_b", to_b, persistent=False)                                 # (G, B, W)
        self.register_buffer("to_a", to.sha[:, idx].contiguous(), persistent=False)          # (A, G)
        self.register_buffer("from_a", fr.sha[:, idx].t().contiguous(), persistent=False)    # (G, A)
        self.register_buffer("from_b", from_b, persistent=False)                             # (G, W, B)
        self.register_buffer("pad_idx", torch.tensor(pad_idx), persistent=False)
        self.register_buffer("unpad_idx", torch.tensor(unpad_idx), persistent=False)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        z, _, c = x.shape
        return x.transpose(0, 1).index_select(0, self.pad_idx).reshape(self.num_m, self.width, z * c)

    def _unpad(self, xp: torch.Tensor, z: int, c: int) -> torch.Tensor:
        return xp.reshape(self.num_m * self.width, z, c).index_select(0, self.unpad_idx).transpose(0, 1)

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """(Z, I, C) -> (A, B, Z, C)."""
        z, _, c = x.shape
        t = torch.bmm(self.to_b.to(x.dtype), self._pad(x))                              # (G, B, ZC)
        return (self.to_a.to(x.dtype) @ t.reshape(self.num_m, -1)).reshape(self.res_long, self.res_lat, z, c)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """(A, B, Z, C) -> (Z, I, C)."""
        _, _, z, c = grid.shape
        a = (self.from_a.to(grid.dtype) @ grid.reshape(self.res_long, -1)).reshape(self.num_m, self.res_lat, -1)
        return self._unpad(torch.bmm(self.from_b.to(grid.dtype), a), z, c)

    def from_grid_adjoint(self, g: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`from_grid`: (Z, I, C) -> (A, B, Z, C)."""
        z, _, c = g.shape
        a = torch.bmm(self.from_b.to(g.dtype).transpose(1, 2), self._pad(g))            # (G, B, ZC)
        out = self.from_a.to(g.dtype).t() @ a.reshape(self.num_m, -1)
        return out.reshape(self.res_long, self.res_lat, z, c)

    def to_grid_adjoint(self, gg: torch.Tensor) -> torch.Tensor:
        """Transpose of :meth:`to_grid`: (A, B, Z, C) -> (Z, I, C)."""
        _, _, z, c = gg.shape
        t = (self.to_a.to(gg.dtype).t() @ gg.reshape(self.res_long, -1)).reshape(self.num_m, self.res_lat, -1)
        return self._unpad(torch.bmm(self.to_b.to(gg.dtype).transpose(1, 2), t), z, c)


class _GridSiLU(torch.autograd.Function):
    """from_grid(silu(to_grid(x))) that saves only ``x``: the (long x lat x C) grid of every edge is
    recomputed in backward, chunk by chunk, instead of being kept alive for the whole forward.
    The backward uses differentiable ops only, so double backward (conservative forces) works."""

    @staticmethod
    def forward(ctx, x, grid_module, chunk):
        ctx.grid, ctx.chunk = grid_module, chunk
        ctx.save_for_backward(x)
        outs = [grid_module.from_grid(F.silu(grid_module.to_grid(xc))) for xc in x.split(chunk)]
        return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        grid = ctx.grid
        outs = []
        for xc, gc in zip(x.split(ctx.chunk), gy.split(ctx.chunk)):
            go, u = grid.from_grid_adjoint(gc), grid.to_grid(xc)
            if torch.is_grad_enabled():   # create_graph: differentiable form (silu_backward has no derivative)
                sig = torch.sigmoid(u)
                gg = go * sig * (1 + u * (1 - sig))
            else:
                gg = torch.ops.aten.silu_backward(go, u)
            outs.append(grid.to_grid_adjoint(gg))
        return (torch.cat(outs) if len(outs) > 1 else outs[0]), None, None


def grid_silu(x: torch.Tensor, grid: S2Grid, chunk: int = 0) -> torch.Tensor:
    """Point-wise SiLU on the sphere, back to coefficients; memory-lean (grids recomputed in backward).

    ``chunk``: rows per chunk; 0 = automatic (on CPU grids of ~2 MB, which stay in the allocator's
    free lists and the cache instead of page-faulting fresh memory; elsewhere one chunk).
    """
    if x.shape[0] == 0:      # no edges (e.g. isolated atoms only)
        return x * 0
    if chunk <= 0:
        if x.device.type == "cpu":
            chunk = max(1, (1 << 19) // (grid.res_lat * grid.res_long * x.shape[2]))
        else:
            chunk = max(1, x.shape[0])
    return _GridSiLU.apply(x, grid, chunk)


# ------------------------------------------------------------------------------------------------
# linear maps and norms on (N, (L+1)^2, C) features


class SO3Linear(nn.Module):
    """Degree-wise linear map (weights shared over m; bias on l = 0 only)."""

    def __init__(self, in_features: int, out_features: int, lmax: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.lmax = in_features, out_features, lmax
        bound = 1 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(lmax + 1, out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_l = x.split(_degree_sizes(self.lmax), dim=1)
        outs = [torch.nn.functional.linear(x_l[0], self.weight[0], self.bias)]
        for l in range(1, self.lmax + 1):
            outs.append(torch.nn.functional.linear(x_l[l], self.weight[l]))
        return torch.cat(outs, dim=1)


def _degree_sizes(lmax: int) -> list[int]:
    """Rows of each degree l = 0..lmax in full (L+1)^2 features: 1, 3, 5, ..."""
    return [2 * l + 1 for l in range(lmax + 1)]


def _degree_expand(lmax: int, start: int = 0) -> list[int]:
    return [l for l in range(start, lmax + 1) for _ in range(2 * l + 1)]


class EquivariantLayerNormSH(PreciseBuffers):
    """``layer_norm_sh``: LayerNorm on l = 0; for l > 0 one RMS over all m and channels, each degree
    weighted 1/((2l+1) L) (balanced degrees), then a per-degree, per-channel affine scale."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.lmax, self.channels, self.eps = lmax, channels, eps
        self.norm_l0 = nn.LayerNorm(channels, eps=eps)
        if lmax > 0:
            self.affine_weight = nn.Parameter(torch.ones(lmax, channels))
            bal = torch.tensor([1.0 / ((2 * l + 1) * lmax) for l in _degree_expand(lmax, 1)], dtype=torch.float64)
            self.register_buffer("balance", bal, persistent=False)    # fp64, cast at use
            self.register_buffer("expand", torch.tensor([l - 1 for l in _degree_expand(lmax, 1)]), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.norm_l0(x[:, :1])
        if self.lmax == 0:
            return s
        v = x[:, 1:]
        ms = torch.einsum("nic,i->n", v.pow(2), self.balance.to(v.dtype)) / self.channels
        scale = (ms + self.eps).rsqrt()
        w = self.affine_weight.index_select(0, self.expand)                  # ((L+1)^2-1, C)
        return torch.cat([s, v * scale[:, None, None] * w], dim=1)


class EquivariantRMSNormSH(PreciseBuffers):
    """``rms_norm_sh``: one RMS over all degrees (l >= 0, balanced), centred l = 0 bias."""

    def __init__(self, lmax: int, channels: int, eps: float = 1e-5, centering: bool = True) -> None:
        super().__init__()
        self.lmax, self.channels, self.eps, self.centering = lmax, channels, eps, centering
        self.affine_weight = nn.Parameter(torch.ones(lmax + 1, channels))
        if centering:
            self.affine_bias = nn.Parameter(torch.zeros(channels))
        bal = torch.tensor([1.0 / ((2 * l + 1) * (lmax + 1)) for l in _degree_expand(lmax)], dtype=torch.float64)
        self.register_buffer("balance", bal, persistent=False)        # fp64, cast at use
        self.register_buffer("expand", torch.tensor(_degree_expand(lmax)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.centering:
            s = x[:, :1]
            x = torch.cat([s - s.mean(dim=2, keepdim=True), x[:, 1:]], dim=1)
        ms = torch.einsum("nic,i->n", x.pow(2), self.balance.to(x.dtype)) / self.channels
        scale = (ms + self.eps).rsqrt()
        out = x * scale[:, None, None] * self.affine_weight.index_select(0, self.expand)
        if self.centering:
            out = torch.cat([out[:, :1] + self.affine_bias, out[:, 1:]], dim=1)
        return out


def make_norm(kind: str, lmax: int, channels: int) -> nn.Module:
    if kind == "layer_norm_sh":
        return EquivariantLayerNormSH(lmax, channels)
    if kind == "rms_norm_sh":
        return EquivariantRMSNormSH(lmax, channels)
    raise ValueError(f"norm_type must be 'layer_norm_sh' or 'rms_norm_sh', got {kind!r}")
