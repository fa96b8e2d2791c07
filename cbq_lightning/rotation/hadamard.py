"""Orthogonal matrices for rotations: randomised Hadamard matrices of any order that has one we can build,
random orthogonal matrices otherwise.

Why Hadamard: every entry of a normalised Hadamard matrix has magnitude ``1/sqrt(n)``, so rotating a vector
with one large coordinate spreads it evenly over all coordinates (the "incoherence" QuaRot and QuIP rely on);
a random orthogonal matrix does so only on average. Random signs on the rows make the rotation a random draw
from a family, so a seed changes it.

Orders: model widths are rarely powers of two (SmolLM2: 576 = 36 x 16, 1536 = 12 x 128; Qwen2.5-0.5B:
896 = 28 x 32), so an order ``n`` is built as a Kronecker product ``H_m (x) H_{2^k}`` of a Sylvester matrix
and a Paley matrix of order ``m``: Paley's first construction gives ``q + 1`` for a prime ``q = 3 mod 4``
(12, 20, 24, 32, 44, 48, 60, 72, ...), his second ``2 (q + 1)`` for a prime ``q = 1 mod 4`` (12, 28, 36, 60,
76, ...). Widths with no such factorisation fall back to a random orthogonal matrix (QR of a Gaussian), and
:func:`construction` says which one a width gets, so the report can state it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Orthogonal", "construction", "hadamard", "orthogonal"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _legendre(a: int, q: int) -> int:
    """The quadratic character of ``a`` modulo the prime ``q``: 0, 1 or -1."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = chi(j - i)`` for the prime ``q`` (skew-symmetric when q = 3 mod 4, symmetric when 1 mod 4)."""
    chi = torch.tensor([_legendre(a, q) for a in range(q)], dtype=torch.float64)
    index = torch.arange(q)
    return chi[(index[None, :] - index[:, None]) % q]


def _paley_construction(m: int) -> int | None:
    """Which Paley construction (1 or 2) gives a Hadamard matrix of order ``m``, or None: arithmetic only, so
    that searching for a factorisation builds no matrix."""
    if (m - 1) % 4 == 3 and _is_prime(m - 1):
        return 1
    if m % 2 == 0 and (m // 2 - 1) % 4 == 1 and _is_prime(m // 2 - 1):
        return 2
    return None


def _paley(m: int) -> torch.Tensor | None:
    """An (unnormalised, +-1) Hadamard matrix of order ``m`` from a Paley construction, or None."""
    kind = _paley_construction(m)
    q = m - 1
    if kind == 1:  # Paley I: I + [[0, 1^T], [-1, Q]]
        core = torch.zeros(m, m, dtype=torch.float64)
        core[0, 1:] = 1
        core[1:, 0] = -1
        core[1:, 1:] = _jacobsthal(q)
        return core + torch.eye(m, dtype=torch.float64)
    q = m // 2 - 1
    if kind == 2:  # Paley II: a symmetric conference matrix, doubled
        conference = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        conference[0, 1:] = 1
        conference[1:, 0] = 1
        conference[1:, 1:] = _jacobsthal(q)
        plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(conference, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


def _sylvester(k: int) -> torch.Tensor:
    matrix = torch.ones(1, 1, dtype=torch.float64)
    step = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    for _ in range(k):
        matrix = torch.kron(matrix, step)
    return matrix


def _factor(n: int) -> tuple[int, int] | None:
    """``(m, k)`` with ``n = m * 2^k`` and a Hadamard matrix of order ``m`` we can build (largest ``k`` first)."""
    k = (n & -n).bit_length() - 1 if n > 0 else 0
    while k >= 0:
        m = n >> k
        if m == 1 or _paley_construction(m) is not None:
            return m, k
        k -= 1
    return None


def construction(n: int) -> str:
    """How :func:`orthogonal` builds its matrix of order ``n`` (for reports): e.g. ``hadamard 36 (paley) x 16``."""
    factor = _factor(n)
    if factor is None:
        return "random orthogonal (no Hadamard construction for this order)"
    m, k = factor
    if m == 1:
        return f"hadamard {n} (sylvester)"
    return f"hadamard {m} (paley)" if k == 0 else f"hadamard {m} (paley) x {2 ** k} (sylvester)"


def _factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A, B)``, normalised Hadamard matrices with ``A (x) B`` of order ``n`` (``A`` the Paley or trivial
    factor, ``B`` the Sylvester one), or None when :func:`construction` finds none."""
    factor = _factor(n)
    if factor is None:
        return None
    m, k = factor
    small = torch.ones(1, 1, dtype=torch.float64) if m == 1 else _paley(m)
    return small / math.sqrt(m), _sylvester(k) / math.sqrt(2**k)


def hadamard(n: int) -> torch.Tensor | None:
    """A normalised (orthogonal) Hadamard matrix of order ``n`` in float64, or None when none can be built."""
    factors = _factors(n)
    return None if factors is None else torch.kron(*factors)


@dataclass(frozen=True)
class Orthogonal:
    """A random orthogonal matrix as drawn: ``diag(signs) (left (x) right)`` for a randomised Hadamard matrix,
    or ``dense`` for a random orthogonal one (float64).

    Why keep the factors: ``x diag(s) (A (x) B)`` is ``A^T X B`` on ``x`` reshaped to ``[m, 2^k]``, which costs
    ``m^2 2^k + m 4^k`` multiply-adds per vector instead of ``n^2`` (1536 = 12 x 128: 215 k instead of
    2.36 M): what an online rotation costs at inference (:mod:`cbq_lightning.rotation.online`)."""

    signs: torch.Tensor | None = None
    left: torch.Tensor | None = None
    right: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.dense.shape[0] if self.dense is not None else self.signs.shape[0])

    def matrix(self) -> torch.Tensor:
        """The whole ``n x n`` matrix (for folding into weights)."""
        if self.dense is not None:
            return self.dense
        return self.signs[:, None] * torch.kron(self.left, self.right)


def orthogonal(n: int, generator: torch.Generator, kind: str = "hadamard") -> Orthogonal:
    """A random orthogonal ``n x n`` matrix: ``diag(s) H`` with random signs ``s`` (``kind`` hadamard, where
    :func:`construction` finds one), else the Q factor of a Gaussian matrix with its signs fixed so that the
    draw is uniform (Haar)."""
    if kind not in ("hadamard", "random"):
        raise ValueError(f"unknown rotation kind {kind!r}")
    factors = _factors(n) if kind == "hadamard" else None
    if factors is not None:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1
        return Orthogonal(signs=signs, left=factors[0], right=factors[1])
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return Orthogonal(dense=q * torch.sign(torch.diagonal(r))[None, :])
