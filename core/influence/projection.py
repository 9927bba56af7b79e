"""Seeded random projection of per-example gradients (see core.influence)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import torch

# Elements of one generated projection block (16 MiB in float32): bounds generation memory.
PROJECTION_BLOCK_ELEMS = 1 << 22
# Projection blocks are cached across batches and checkpoints up to this many bytes.
PROJECTION_CACHE_BYTES = 1 << 30


class Projector:
    """Seeded Gaussian projection to ``dim``, generated in row blocks per parameter."""

    def __init__(self, dim: int, seed: int, device: torch.device) -> None:
        """Remember the dimension, seed and device; blocks are made on first use."""
        self.dim = dim
        self.seed = seed
        self.device = device
        self.scale = 1.0 / math.sqrt(dim)
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self._cached_bytes = 0

    def _layout(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(rows, row size, rows per block) of a parameter of ``shape``."""
        rows = int(shape[0]) if len(shape) else 1
        row_size = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        per_block = max(1, PROJECTION_BLOCK_ELEMS // (row_size * self.dim))
        return rows, row_size, per_block

    def _block(self, name: str, shape: Sequence[int], b: int) -> torch.Tensor:
        """Projection block ``b`` of parameter ``name``: (dim, rows_in_block × row size)."""
        key = (name, b)
        if key in self._cache:
            return self._cache[key]
        rows, row_size, per_block = self._layout(shape)
        n_rows = min(per_block, rows - b * per_block)
        # A generator per block, seeded from (seed, name, block), makes the projection
        # independent of the order in which blocks are needed.
        crc = zlib.crc32(name.encode("utf-8"))
        block_seed = ((self.seed * 1_000_003 + crc) * 1_000_033 + b) % (2**63 - 1)
        gen = torch.Generator(device="cpu").manual_seed(block_seed)
        block = torch.randn(self.dim, n_rows * row_size, generator=gen).mul_(self.scale)
        block = block.to(self.device)
        nbytes = block.numel() * block.element_size()
        if self._cached_bytes + nbytes <= PROJECTION_CACHE_BYTES:
            self._cache[key] = block
            self._cached_bytes += nbytes
        return block

    def project(self, name: str, shape: Sequence[int], grads: torch.Tensor) -> torch.Tensor:
        """Project dense per-example gradients (B, numel) to (B, dim)."""
        rows, row_size, per_block = self._layout(shape)
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device)
        for b in range(math.ceil(rows / per_block)):
            lo = b * per_block * row_size
            hi = min(rows, (b + 1) * per_block) * row_size
            out.addmm_(grads[:, lo:hi], self._block(name, shape, b).T)
        return out

    def project_rows(
        self, name: str, shape: Sequence[int], rows_idx: torch.Tensor, grads: torch.Tensor
    ) -> torch.Tensor:
        """Project gradients nonzero only on sorted rows ``rows_idx``: (B, k, row size) → (B, dim).

        Equals :meth:`project` of the dense gradient, without materialising it.
        """
        _, row_size, per_block = self._layout(shape)
        out = torch.zeros(grads.shape[0], self.dim, device=grads.device)
        block_of = rows_idx // per_block
        for b in torch.unique(block_of).tolist():
            sel = (block_of == b).nonzero().squeeze(1)
            local = rows_idx[sel] - b * per_block
            block = self._block(name, shape, b).view(self.dim, -1, row_size)
            r = block.index_select(1, local).reshape(self.dim, -1)
            out.addmm_(grads.index_select(1, sel).reshape(grads.shape[0], -1), r.T)
        return out
