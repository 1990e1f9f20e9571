"""The radial bases never produce subnormal floats (x86 arithmetic on them is 20-40x slower)."""

import math

import torch

from lamm_ds.model.equiformer_v2 import gaussian_basis
from lamm_ds.model.numerics import gaussian
from lamm_ds.model.painn import RadialBasis


def _subnormal_count(t: torch.Tensor) -> int:
    tiny = torch.finfo(t.dtype).tiny
    return int(((t != 0) & (t.abs() < tiny)).sum())


def test_gaussian_cuts_only_what_no_float_can_resolve():
    x = torch.linspace(-200.0, 0.0, 20001, dtype=torch.float64)
    out = gaussian(x)
    assert torch.equal(out[x >= -36.0], torch.exp(x[x >= -36.0]))
    assert torch.all(out[x < -36.0] == 0)
    assert (torch.exp(x) - out).abs().max() < 2.4e-16
    assert gaussian(x.float()).dtype == torch.float32


def test_painn_gaussian_basis_has_no_subnormals_and_matches_plain_exp():
    rc, n = 5.0, 20
    r = torch.linspace(0.0, rc, 50001)
    basis = RadialBasis(n, rc, "gaussian")(r)
    assert _subnormal_count(basis) == 0
    # the uncut basis of the same r does have them: the cut is what removes them
    centers = torch.linspace(0.0, rc, n)
    plain = torch.exp(-0.5 / (rc / (n - 1)) ** 2 * (r.unsqueeze(-1) - centers) ** 2)
    assert _subnormal_count(plain) > 0
    fcut = 0.5 * (torch.cos(r * (math.pi / rc)) + 1.0)
    assert (basis - plain * fcut.unsqueeze(-1)).abs().max() < 1e-15


def test_equiformer_gaussian_basis_has_no_subnormals():
    r = torch.linspace(0.0, 12.0, 20001)
    basis = gaussian_basis(r, 12.0, 600, 2.0)
    assert _subnormal_count(basis) == 0
    assert basis.max() == 1.0


def test_gaussian_gradients_stay_finite_and_zero_in_the_cut_tail():
    x = torch.tensor([-50.0, -36.0, -1.0, 0.0], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(gaussian(x).sum(), x, create_graph=True)
    assert g[0] == 0 and torch.allclose(g[1:], torch.exp(x[1:]))
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert torch.isfinite(gg).all() and gg[0] == 0


def test_permute_rows_gradients_match_index_select_to_second_order():
    from lamm_ds.model.so3 import permute_rows

    perm = torch.tensor([2, 0, 3, 1])
    inverse = torch.argsort(perm)
    x = torch.randn(3, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.equal(permute_rows(x, perm, inverse), x.index_select(1, perm))
    torch.autograd.gradcheck(lambda t: permute_rows(t, perm, inverse), (x,))
    torch.autograd.gradgradcheck(lambda t: permute_rows(t, perm, inverse) ** 2, (x,))
