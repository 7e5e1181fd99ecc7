"""Small synthetic phantoms shared by the tests, and a brute-force reference for blended grid inference."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import strategies as st
from monai.data import MetaTensor


def box_slices(location: torch.Tensor) -> tuple[slice, ...]:
    """Channel-first slices of the box ``[starts..., ends...]``."""
    loc = [int(v) for v in location]
    n = len(loc) // 2
    return (slice(None),) + tuple(slice(loc[i], loc[n + i]) for i in range(n))


def make_label_map(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """uint8 map (1, *shape): background 0 and three nested boxes 1 (largest) .. 3 (smallest)."""
    lab = torch.zeros((1, *shape), dtype=torch.uint8)
    for value, frac in ((1, 0.6), (2, 0.35), (3, 0.15)):
        sl = tuple(slice(int(s * (0.5 - frac / 2)), max(int(s * (0.5 + frac / 2)), int(s * (0.5 - frac / 2)) + 1))
                   for s in shape)
        lab[(0, *sl)] = value
    return lab


@pytest.fixture
def subject() -> dict:
    """A 3D subject: unique-valued float image, a 4-label uint8 map, a probability map and a non-array entry."""
    shape = (24, 20, 16)
    image = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(1, *shape)
    affine = torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-10.0, 5.0, 7.0])
    return {
        "image": MetaTensor(image, affine=affine),
        "label": MetaTensor(make_label_map(shape), affine=affine),
        "prob": MetaTensor(torch.rand((1, *shape), generator=torch.Generator().manual_seed(0)), affine=affine),
        "name": "case_000",
    }


@st.composite
def grid_setups(draw, max_patch: int, max_shape: int, paddings: list) -> tuple:
    """``(shape, patch, overlap, padding)`` of a 2D or 3D grid: patches of 2..max_patch, any valid overlap."""
    ndim = draw(st.sampled_from([2, 3]))
    patch = tuple(draw(st.integers(2, max_patch)) for _ in range(ndim))
    overlap = tuple(draw(st.integers(0, p - 1)) for p in patch)
    shape = tuple(draw(st.integers(1, max_shape)) for _ in range(ndim))
    return shape, patch, overlap, draw(st.sampled_from(paddings))


def reference_hann_blend(x: torch.Tensor, network, patch: int, overlap: int) -> np.ndarray:
    """What ``GridInferer(patch, overlap, "hann")`` must return, by brute force and independently of the package.

    Per axis of size ``S`` the corners are ``0, P-O, 2(P-O), ...`` below ``S-P``, then ``S-P``. Each patch goes
    through ``network`` on its own; its output is weighted by the outer product of the closed-form window
    ``sin^2(pi (n + 1) / (P + 1))`` on each axis, and the sum of weighted outputs is divided by the sum of weights.
    Returns a float64 array of ``network``'s output shape for the whole ``x`` (``(B, C, *spatial)``).
    """
    spatial = x.shape[2:]
    window = np.sin(np.pi * np.arange(1, patch + 1) / (patch + 1)) ** 2
    weight = window
    for _ in spatial[1:]:
        weight = weight[..., None] * window
    corners = [sorted({*range(0, s - patch, patch - overlap), s - patch}) for s in spatial]
    total, norm = None, np.zeros(spatial)
    for corner in itertools.product(*corners):
        box = tuple(slice(c, c + patch) for c in corner)
        out = network(x[(slice(None), slice(None), *box)]).detach().double().numpy()
        if total is None:
            total = np.zeros((*out.shape[:2], *spatial))
        total[(slice(None), slice(None), *box)] += out * weight
        norm[box] += weight
    return total / norm
