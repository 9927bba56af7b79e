"""Encoded instances handed to the engine as trimmed, length-sorted batches."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch

from core.storage.errors import AtlasError


class EncodedData:
    """Encoded instances on the CPU, handed out as trimmed, length-sorted device batches."""

    def __init__(self, data: dict[str, torch.Tensor], what: str) -> None:
        """Validate the tensors of ``data`` ('input_ids', 'attention_mask', 'labels', ...)."""
        for key in ("input_ids", "attention_mask", "labels"):
            if key not in data:
                raise AtlasError(f"The {what} data has no '{key}' tensor.")
        ids = torch.as_tensor(data["input_ids"]).long().cpu()
        mask = torch.as_tensor(data["attention_mask"]).long().cpu()
        labels = torch.as_tensor(data["labels"]).long().cpu().reshape(-1)
        if ids.ndim != 2 or mask.shape != ids.shape or labels.shape[0] != ids.shape[0]:
            raise AtlasError(
                f"The {what} data must hold input_ids and attention_mask of one shape (n, L) "
                "and n labels."
            )
        if ids.shape[0] == 0:
            raise AtlasError(f"The {what} data holds no instances.")
        self.ids = ids
        self.mask = mask
        self.labels = labels
        tt = data.get("token_type_ids")
        self.token_types = None if tt is None else torch.as_tensor(tt).long().cpu()
        # Right padding: the used width of a row is one past its last real token.
        idx = torch.arange(ids.shape[1]).expand_as(mask)
        self.widths = ((idx + 1) * (mask > 0)).max(dim=1).values.numpy()
        self.n = ids.shape[0]

    def batches(self, index: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
        """Yield sub-arrays of ``index``, sorted by width so little padding is computed."""
        order = index[np.argsort(self.widths[index], kind="stable")]
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def token_batches(
        self, index: np.ndarray, max_tokens: int, max_rows: int
    ) -> Iterator[np.ndarray]:
        """Yield sub-arrays of ``index`` sorted by width, each of at most ``max_rows`` rows and
        ``max_tokens`` padded tokens (rows × widest row; a row wider than that goes alone)."""
        order = index[np.argsort(self.widths[index], kind="stable")]
        start = 0
        while start < len(order):
            stop = start + 1
            # Widths ascend, so a batch's padded width is that of its last row.
            while (
                stop < len(order)
                and stop - start < max_rows
                and (stop - start + 1) * max(1, int(self.widths[order[stop]])) <= max_tokens
            ):
                stop += 1
            yield order[start:stop]
            start = stop

    def take(self, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        """Tensors of ``rows`` cut to their widest row and moved to ``device``."""
        width = max(1, int(self.widths[rows].max()))
        sel = torch.as_tensor(rows, dtype=torch.long)
        out = {
            "input_ids": self.ids[sel, :width].to(device),
            "attention_mask": self.mask[sel, :width].to(device),
            "labels": self.labels[sel].to(device),
        }
        if self.token_types is not None:
            out["token_type_ids"] = self.token_types[sel, :width].to(device)
        return out

    def fingerprint(self) -> str:
        """Short hash of the tensors, so shards of other data are never reused."""
        h = hashlib.sha1()
        for t in (self.ids, self.mask, self.labels, self.token_types):
            if t is not None:
                h.update(t.numpy().tobytes())
        return h.hexdigest()[:16]


def vocab_of(data: EncodedData, rows: np.ndarray) -> torch.Tensor:
    """Sorted word ids that occur (unmasked) in ``rows``."""
    sel = torch.as_tensor(rows, dtype=torch.long)
    return torch.unique(data.ids[sel][data.mask[sel] > 0])
