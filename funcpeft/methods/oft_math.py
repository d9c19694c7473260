"""OFT's math as pure tensor functions: packed skew-symmetric vectors, their (Cayley-Neumann) rotations, COFT's
projection, and the block-diagonal rotation of features, of weights and of per-row inputs.

PEFT 0.21.2 (``peft.tuners.oft.layer.OFTRotationModule``) stores each block's skew-symmetric matrix ``Q`` as the
``b (b - 1) / 2`` entries above its diagonal, in ``torch.triu_indices`` order (row-major), and turns it into an
orthogonal block ``R`` by the Cayley transform ``R = (I - Q)(I + Q)^-1``, or by its truncated Neumann series.
Everything here works on any leading batch dimensions, so that ``torch.func.vmap``, mixed batches (one rotation
per row) and ``torch.compile(fullgraph=True)`` all run the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["skew", "cayley", "project", "rotations", "rotate", "rotate_weight", "adjust", "block_eps"]


def skew(vec: Tensor, block_size: int) -> Tensor:
    """The skew-symmetric ``(..., b, b)`` matrices whose strict upper triangles are ``vec`` ``(..., b(b-1)/2)``.

    Built by gathering from ``vec`` (padded with a leading zero) rather than by an in-place index assignment, so it
    composes with ``vmap`` over ``vec``.
    """
    b = block_size
    rows, cols = torch.triu_indices(b, b, 1, device=vec.device)
    index = torch.zeros(b * b, dtype=torch.long, device=vec.device)
    index[rows * b + cols] = torch.arange(1, rows.numel() + 1, device=vec.device)
    upper = F.pad(vec, (1, 0)).index_select(-1, index).reshape(*vec.shape[:-1], b, b)
    return upper - upper.transpose(-1, -2)


def cayley(q: Tensor, neumann: bool, terms: int) -> Tensor:
    """Orthogonal blocks from skew-symmetric ``q`` ``(..., b, b)``, as PEFT's ``_cayley_batch``.

    Exact: ``(I - Q)(I + Q)^-1``, solved in at least float32 and returned in ``q``'s dtype. Neumann (``terms`` >= 2):
    PEFT's series ``I + 2Q + 2Q^2 + ... + 2Q^(m-1) + Q^m`` with ``m = max(3, terms - 1)`` for ``terms`` >= 3 (so 3
    and 4 terms give the same series, as in PEFT) and ``I + 2Q`` for 2 terms; the additions run in PEFT's order.
    """
    if not neumann:  # at least float32, as PEFT's float32 identity promotes it (no LU for half types on CPU)
        work = torch.promote_types(q.dtype, torch.float32)
        eye = torch.eye(q.shape[-1], dtype=work, device=q.device).expand(q.shape)
        return torch.linalg.solve(eye + q, eye - q, left=False).to(q.dtype)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    r = eye + 2.0 * q  # 2 * Q is exact, so this is PEFT's fused `R.add_(Q, alpha=2)`
    if terms > 2:
        power = q @ q
        r = r + 2.0 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2.0 * power
        r = r + power @ q
    return r


def block_eps(eps: float, blocks: int) -> float:
    """COFT's per-block radius ``eps / sqrt(blocks)``, rounded as PEFT computes it (``blocks`` is the number of
    stored blocks: 1 with ``block_share``): PEFT's ``eps / torch.sqrt(torch.tensor(blocks))`` runs in float32 as
    ``reciprocal(sqrt(blocks)) * eps`` (a tensor's ``__rtruediv__``), which can differ from a float32 division."""
    root = torch.tensor(blocks).sqrt()  # float32, as PEFT's (an int64 tensor's sqrt)
    return float(root.reciprocal() * eps)


def project(vec: Tensor, block_size: int, eps: float) -> Tensor:
    """COFT's projection (PEFT's ``_project_batch``): each block's ``Q`` scaled onto the Frobenius ball of radius
    ``eps`` when it lies outside it, unchanged inside."""
    q = skew(vec, block_size)
    norm = torch.linalg.matrix_norm(q).unsqueeze(-1)  # (..., blocks, 1)
    # PEFT's radius is a float32 0-dim tensor: against a half-precision `vec` it is rounded to that dtype first
    # (a Python float would not be), so it is one here too.
    radius = torch.tensor(eps, dtype=torch.float32, device=vec.device)
    return torch.where(norm <= radius, vec, radius * (vec / norm))


def rotations(vec: Tensor, block_size: int, neumann: bool, terms: int, coft_eps: float | None) -> Tensor:
    """The orthogonal blocks ``(..., blocks, b, b)`` for packed vectors ``vec`` ``(..., blocks, b(b-1)/2)``.

    With COFT (``coft_eps`` set) the vectors are projected first. PEFT projects in place under ``no_grad`` before
    each forward, so its gradient is the gradient at the projected point applied to the stored tensor; funcpeft
    never writes to ``params``, so it uses the projected value with that same straight-through gradient
    (``project(vec) + (vec - vec.detach())``: the forward value is exactly the projected one, in any dtype).
    """
    if coft_eps is not None:
        vec = project(vec.detach(), block_size, coft_eps) + (vec - vec.detach())
    return cayley(skew(vec, block_size), neumann, terms)


def rotate(h: Tensor, blocks: Tensor, n_blocks: int) -> Tensor:
    """``h @ blockdiag(R_1, ..., R_r)`` over the last dimension of ``h`` ``(..., r * b)`` (PEFT's forward order).

    ``blocks`` is ``(r, b, b)``, or ``(1, b, b)`` shared by all ``n_blocks`` blocks (``block_share``).
    """
    b = blocks.shape[-1]
    blocks = blocks.expand(n_blocks, b, b)
    out = torch.einsum("...rk,rkc->...rc", h.reshape(*h.shape[:-1], n_blocks, b), blocks)
    return out.reshape(h.shape)


def rotate_rows(h: Tensor, blocks: Tensor, n_blocks: int) -> Tensor:
    """:func:`rotate` with one rotation per row: ``h`` ``(B, ..., r * b)``, ``blocks`` ``(B, r | 1, b, b)``."""
    n, b = h.shape[0], blocks.shape[-1]
    blocks = blocks.expand(n, n_blocks, b, b)
    out = torch.einsum("nlrk,nrkc->nlrc", h.reshape(n, -1, n_blocks, b), blocks)
    return out.reshape(h.shape)


def rotate_weight(weight: Tensor, blocks: Tensor, n_blocks: int) -> Tensor:
    """``W @ blockdiag(R)^T`` for a canonical weight ``(out, in, *kernel)`` flattened to ``(out, in * prod(kernel))``
    (PEFT's merge: ``(blockdiag(R) @ W^T)^T``), with ``blocks`` ``(..., r | 1, b, b)``: one weight per leading
    index of ``blocks`` (``(..., out, in, *kernel)``)."""
    out, b = weight.shape[0], blocks.shape[-1]
    blocks = blocks.expand(*blocks.shape[:-3], n_blocks, b, b)
    flat = weight.reshape(out, n_blocks, b)
    rotated = torch.einsum("oik,...ijk->...oij", flat, blocks)
    return rotated.reshape(*blocks.shape[:-3], *weight.shape)


def adjust(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest to ``value`` (the lower one on a tie;
    ``features`` itself when ``value`` exceeds it)."""
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher:
        higher += 1
    lower = value
    while lower > 1 and features % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher
