"""Factorized (LoGra-style, Kronecker) gradient projection: TracIn over every parameter.

For a linear layer applied at positions t of an instance, the weight gradient is
``G = Σ_t g_t x_tᵀ`` (g_t: gradient of the loss with respect to the layer's output at t, x_t:
its input). Projecting both sides with seeded Gaussian matrices P_in (d_in × K) and P_out
(d_out × K) gives ``P_outᵀ G P_in = Σ_t (P_outᵀ g_t)(P_inᵀ x_t)ᵀ``, a K × K matrix computed
from the layer's activations without ever forming G. Entries of every P are N(0, 1/K), so
``E[P Pᵀ] = I`` and, P_in and P_out being independent, ``E⟨P_outᵀ G P_in, P_outᵀ G' P_in⟩ =
⟨G, G'⟩``: the projected dot product is unbiased (Choe et al. 2024, "What is your data worth
to GPT?", LoGra; dattri implements the same idea).

How one batch is processed: hooks record every ``nn.Linear``, ``nn.Embedding`` and
``nn.LayerNorm`` call during ONE ordinary batched forward pass; one backward of the summed
per-example losses (``torch.autograd.grad`` with respect to the recorded outputs, so no weight
gradient is ever computed) gives every g_t. The loss is a sum over instances and the model
(eval mode, no batch statistics) never mixes instances, so the g_t of instance b belong to
instance b's own loss. The model gets the engine's 4-D additive key mask; padded positions
are zeroed explicitly in the recorded inputs, so they contribute nothing.

Parameter by parameter (K is the per-side dimension; a side whose dimension d ≤ K is kept
exact, the identity, because projecting it could only add noise and width):

- ``nn.Linear`` weight: ``Σ_t ĝ_t x̂_tᵀ`` (K_out × K_in). Bias: its gradient ``Σ_t g_t`` is
  projected with the layer's own P_out, i.e. ``Σ_t ĝ_t`` (K_out values); it costs nothing
  extra and is the bias column of the same outer product (the input augmented by a constant 1
  that is not projected).
- ``nn.Embedding`` (word, position and token-type tables): a lookup is a linear layer whose
  input is the one-hot vector of the index, so ``P_inᵀ x_t`` is row ``id_t`` of P_in
  (num_embeddings × K), gathered, never multiplied. Indices equal to ``padding_idx`` get no
  gradient in PyTorch and are dropped. A table looked up with a batch dimension of 1 (BERT's
  position ids) is expanded to the batch first, so each instance gets its own gradient.
- ``nn.LayerNorm``: γ's gradient ``Σ_t g_t ⊙ n_t`` (n_t the normalised input, recomputed) and
  β's ``Σ_t g_t`` are d-vectors; each is projected with its own seeded Gaussian d × K matrix.
- Any other parameter, or one shared by two modules (tied weights, whose gradient is the sum
  of both modules' parts and so not their concatenation): :class:`AtlasError`. Every
  parameter of BERT-like Hugging Face classifiers is in one of the three module types.

The per-instance feature is the concatenation over modules in the model's order; TracIn of
a checkpoint is ``η · ⟨feat(z), feat(z')⟩``, self-influence ``η · ‖feat(z)‖²``. Projection
matrices depend only on (seed, module name, side), so every checkpoint and batch sees the
same ones. ``identity=True`` (for tests) replaces every projection by the identity: the
feature is then the exact per-example gradient of all parameters (huge for real models).

Work is organised like :class:`core.influence.TracInCP`'s: both are members of the engine family
(:class:`core.influence.base.Engine`), so per checkpoint the test features are computed
once and held, training instances stream through in batches, and the results land in the
family's (checkpoint × training chunk) shards, so ``shard_dir`` resumes a killed run. The run
stage and its task API (``core tracin RUN --project factorized:K``, ``core run --project
factorized:K``) drive either engine; :func:`core.influence.registry.engine_for` picks one from a
projection spec.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core.influence.base import (
    CHUNK_SIZE,
    CheckpointJob,
    Checkpoints,
    Engine,
    Loader,
    TracInResult,
    check_sizes,
    checked_checkpoints,
    default_loader,
    resolve_dtype,
    resolve_engine_device,
)
from core.influence.inputs import EncodedData
from core.options.tracin_options import FACTORIZED
from core.storage.errors import AtlasError

# A batched forward+backward holds activations (not per-example gradients), which grow with
# the padded tokens of the batch: batches hold at most TOKENS_PER_BATCH of them (32 rows of
# 128 tokens, a paper-preset batch at its longest) and at most MAX_ROWS rows, so short
# instances go in larger batches (less Python overhead per instance) at no more memory.
TOKENS_PER_BATCH = 32 * 128
MAX_ROWS = 64


def _gaussian(rows: int, k: int, seed: int, key: str) -> torch.Tensor:
    """Seeded (rows, k) matrix with N(0, 1/k) entries, so that E[P Pᵀ] = I_rows."""
    # One generator per matrix, seeded by (seed, key), makes a matrix independent of the
    # order in which modules are met and identical across checkpoints and devices.
    crc = zlib.crc32(key.encode("utf-8"))
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + crc) % (2**63 - 1))
    return torch.randn(rows, k, generator=gen).mul_(1.0 / math.sqrt(k))


class _Side:
    """One side's projection: a seeded (d, K) Gaussian, or the identity when d ≤ K."""

    def __init__(
        self, d: int, k: int, seed: int, key: str, identity: bool, device: torch.device
    ) -> None:
        """Draw the matrix (or not, for the identity)."""
        self.d = d
        self.mat = None if identity or d <= k else _gaussian(d, k, seed, key).to(device)
        self.width = d if self.mat is None else k

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Project vectors on the last axis: (..., d) → (..., width)."""
        return x if self.mat is None else x @ self.mat

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Projected one-hot vectors of indices: (...) → (..., width)."""
        if self.mat is None:
            return F.one_hot(idx, self.d).float()
        return self.mat[idx]


class _Layer:
    """A module whose parameters the features cover; ``width`` feature columns."""

    width: int

    def feature(
        self, inp: torch.Tensor, out: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """(B, width) projected gradient of one call; ``keep`` (B, T) marks real tokens."""
        raise NotImplementedError


def _as_tokens(x: torch.Tensor, b: int) -> torch.Tensor:
    """(B, ..., d) → (B, T, d); an input without a token axis (a pooled vector) is T = 1."""
    return x.reshape(b, -1, x.shape[-1])


def _token_mask(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
    """(B, T, 1) float mask when ``x`` (B, T, d) runs over the batch's tokens, else None."""
    if x.shape[1] == keep.shape[1]:
        return keep[:, :, None].to(x.dtype)
    return None


def _outer(g_hat: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_t ĝ_t x̂_tᵀ flattened: (B, T, a), (B, T, c) → (B, a·c)."""
    return torch.einsum("bta,btc->bac", g_hat, x_hat).reshape(g_hat.shape[0], -1)


class _LinearLayer(_Layer):
    """``nn.Linear``: weight ``Σ_t ĝ_t x̂_tᵀ``, bias ``Σ_t ĝ_t`` (the layer's own P_out)."""

    def __init__(self, name: str, module: nn.Linear, k: int, seed: int, identity: bool, dev):
        """Draw P_in and P_out for the module ``name``."""
        self.bias = module.bias is not None
        self.p_in = _Side(module.in_features, k, seed, f"{name}|in", identity, dev)
        self.p_out = _Side(module.out_features, k, seed, f"{name}|out", identity, dev)
        self.width = self.p_out.width * (self.p_in.width + int(self.bias))

    def feature(self, inp, out, grad, keep):
        """Kronecker-projected weight (and bias) gradient of one call."""
        b = keep.shape[0]
        x = _as_tokens(inp, b)
        m = _token_mask(x, keep)
        x_hat = self.p_in.apply(x if m is None else x * m)
        if self.bias:
            x_hat = torch.cat([x_hat, x_hat.new_ones(*x_hat.shape[:2], 1)], dim=2)
        g_hat = self.p_out.apply(_as_tokens(grad, b))
        if m is not None:
            g_hat = g_hat * m  # x̂ is already zero there, but the bias column is not
        return _outer(g_hat, x_hat)


class _EmbeddingLayer(_Layer):
    """``nn.Embedding``: a linear layer on one-hot inputs, so P_inᵀ x_t is a gathered row."""

    def __init__(self, name: str, module: nn.Embedding, k: int, seed: int, identity: bool, dev):
        """Draw P_in (num_embeddings × K) and P_out (embedding_dim × K)."""
        self.padding_idx = module.padding_idx
        self.p_in = _Side(module.num_embeddings, k, seed, f"{name}|in", identity, dev)
        self.p_out = _Side(module.embedding_dim, k, seed, f"{name}|out", identity, dev)
        self.width = self.p_out.width * self.p_in.width

    def feature(self, inp, out, grad, keep):
        """Projected table gradient of one lookup (padding and padded positions dropped)."""
        b = keep.shape[0]
        idx = inp.reshape(b, -1)
        use = torch.ones_like(idx, dtype=torch.bool)
        if idx.shape[1] == keep.shape[1]:
            use &= keep
        if self.padding_idx is not None:
            use &= idx != self.padding_idx  # PyTorch never updates the padding row
        x_hat = self.p_in.rows(idx) * use[:, :, None]
        g_hat = self.p_out.apply(_as_tokens(grad, b))
        return _outer(g_hat, x_hat)


class _NormLayer(_Layer):
    """``nn.LayerNorm``: γ's ``Σ_t g_t ⊙ n_t`` and β's ``Σ_t g_t``, each projected to K."""

    def __init__(self, name: str, module: nn.LayerNorm, k: int, seed: int, identity: bool, dev):
        """Draw one d × K projection per parameter."""
        self.shape = tuple(module.normalized_shape)
        self.eps = module.eps
        d = int(np.prod(self.shape))
        self.p_weight = _Side(d, k, seed, f"{name}|weight", identity, dev)
        self.bias = module.bias is not None
        self.p_bias = _Side(d, k, seed, f"{name}|bias", identity, dev) if self.bias else None
        self.width = self.p_weight.width + (self.p_bias.width if self.p_bias else 0)

    def feature(self, inp, out, grad, keep):
        """Projected γ (and β) gradient of one call."""
        b = keep.shape[0]
        normed = F.layer_norm(inp, self.shape, eps=self.eps)  # the input without γ, β
        n = normed.reshape(b, -1, int(np.prod(self.shape)))
        g = grad.reshape(n.shape)
        m = _token_mask(n, keep)
        if m is not None:
            g = g * m
        parts = [self.p_weight.apply((g * n).sum(1))]
        if self.p_bias is not None:
            parts.append(self.p_bias.apply(g.sum(1)))
        return torch.cat(parts, dim=1)


_KINDS: tuple[tuple[type[nn.Module], type[_Layer]], ...] = (
    (nn.Linear, _LinearLayer),
    (nn.Embedding, _EmbeddingLayer),
    (nn.LayerNorm, _NormLayer),
)


class FactorizedGrads:
    """Projected per-example gradients of every parameter of one model (one checkpoint).

    Raises :class:`AtlasError` if the model has no ``nn.Linear`` layer or a parameter that
    is not in an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm`` module.
    """

    def __init__(
        self,
        model: nn.Module,
        k: int,
        seed: int = 0,
        identity: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        """Find the covered modules and draw their projections."""
        self.model = model.eval()
        self.device = torch.device(device)
        self.layers: dict[nn.Module, tuple[int, _Layer]] = {}
        covered: set[int] = set()
        offset = 0
        for name, module in model.named_modules():
            kind = next((lay for typ, lay in _KINDS if isinstance(module, typ)), None)
            own = list(module.parameters(recurse=False))
            if kind is None or not own:
                continue
            if any(id(p) in covered for p in own):
                raise AtlasError(
                    f"The factorized projection cannot handle tied weights, and {name} shares "
                    "a parameter with another layer."
                )
            layer = kind(name, module, k, seed, identity, self.device)
            self.layers[module] = (offset, layer)
            offset += layer.width
            covered.update(id(p) for p in own)
        if not any(isinstance(m, nn.Linear) for m in self.layers):
            raise AtlasError(
                "The factorized projection needs nn.Linear layers, but the model has none."
            )
        for name, param in model.named_parameters():
            if id(param) not in covered:
                raise AtlasError(
                    f"The factorized projection covers nn.Linear, nn.Embedding and nn.LayerNorm "
                    f"parameters only, and {name} belongs to none of them."
                )
        self.width = offset
        self.n_params = int(sum(p.numel() for p in model.parameters()))

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, width) projected loss gradients of a batch (true per-example gradients).

        One forward pass records every covered call, one backward of the summed losses
        gives the output gradients; the features follow from both.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.shape[0]
        keep = mask > 0
        calls: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            inp = args[0]
            if isinstance(module, nn.Embedding) and inp.shape[0] == 1 and b > 1:
                # A lookup shared by the batch (BERT's position ids) is broadcast later, which
                # would sum the instances' gradients; expanded here each gets its own.
                inp = inp.expand(b, *inp.shape[1:])
                output = output.expand(b, *output.shape[1:])
            if inp.shape[0] != b or output.shape[0] != b:
                raise AtlasError(
                    "The factorized projection needs each layer to see the batch one instance "
                    "per row, and a layer of this model does not."
                )
            if not output.requires_grad:
                # A lookup of integer ids: made a leaf that requires grad, so everything
                # downstream records its graph while no parameter does (the backward then
                # computes activation gradients only, never a weight gradient).
                output = output.detach().requires_grad_(True)
            calls.append((module, inp.detach(), output))
            return output

        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = [m.register_forward_hook(hook) for m in self.layers]
        try:
            for p, _ in flags:
                p.requires_grad_(False)  # restored below
            with torch.enable_grad():
                # Additive key mask, as transformers builds it and as the TracIn engine passes it.
                mask_add = (1.0 - mask.float()) * torch.finfo(torch.float32).min
                kwargs = {"input_ids": ids, "attention_mask": mask_add[:, None, None, :]}
                if batch.get("token_type_ids") is not None:
                    kwargs["token_type_ids"] = batch["token_type_ids"]
                out = self.model(**kwargs)
                logits = out.logits if hasattr(out, "logits") else out[0]
                # A sum of per-instance losses: each instance's g_t is its own loss gradient.
                loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                grads = torch.autograd.grad(loss, [o for _, _, o in calls], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
        feats = torch.zeros(b, self.width, device=ids.device)
        with torch.no_grad():
            for (module, inp, output), grad in zip(calls, grads, strict=True):
                if grad is None:  # the call does not reach the loss
                    continue
                offset, layer = self.layers[module]
                feats[:, offset : offset + layer.width] += layer.feature(inp, output, grad, keep)
        return feats


def _check_k(k: Any) -> int:
    """The per-side dimension as a positive int, or :class:`AtlasError`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) <= 0:
        raise AtlasError(
            f"The factorized projection dimension must be a positive integer (got {k!r})."
        )
    return int(k)


class FactorizedTracIn(Engine):
    """TracIn with factorized projected gradients of every parameter, over saved checkpoints.

    ``checkpoints`` is a list of (path or model, learning rate); ``k`` the per-side
    projection dimension. ``batch_size`` fixes the rows per forward+backward (default: up
    to ``MAX_ROWS`` rows and ``TOKENS_PER_BATCH`` padded tokens). ``identity=True`` is a
    test switch: exact gradients, no projection. A member of the engine family
    (:class:`core.influence.base.Engine`); its scores have the layout and semantics of
    :class:`core.influence.TracInCP`'s, and its norms are those of the projected features.
    """

    progress_label = "tracin (factorized)"

    def __init__(
        self,
        checkpoints: Checkpoints,
        k: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        batch_size: int | None = None,
        chunk_size: int = CHUNK_SIZE,
        identity: bool = False,
        loader: Loader | None = None,
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        """Validate the options; checkpoints are loaded one at a time when needed."""
        self.dtype = resolve_dtype(dtype)
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise AtlasError(
                f"The factorized projection's dot products are float32 or bfloat16 (got {dtype})."
            )
        self.checkpoints = checked_checkpoints(checkpoints)
        self.k = _check_k(k)
        check_sizes(batch_size, chunk_size)
        self.seed = int(seed)
        self.device = resolve_engine_device(device)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.chunk_size = int(chunk_size)
        self.identity_projections = bool(identity)
        self.loader = loader or default_loader
        self.n_params: int | None = None
        self.width: int | None = None

    @classmethod
    def from_projection(
        cls, checkpoints: Checkpoints, scope: str, dim: int | None, seed: int, **options: Any
    ) -> FactorizedTracIn:
        """``factorized:dim`` over every parameter (the registry has checked ``scope``)."""
        return cls(checkpoints, dim, seed=seed, **options)

    def options(self) -> dict[str, Any]:
        """Scope ``all``, ``factorized:K``, seed, the identity test switch, dtype, chunk size."""
        return {
            "scope": "all",
            "project": FACTORIZED.record(self.k),
            "seed": self.seed,
            "identity": self.identity_projections,
            "dtype": str(self.dtype).replace("torch.", ""),
            "chunk_size": self.chunk_size,
        }

    def check(self) -> int:
        """Load the first checkpoint and check the method covers it; return its parameter count."""
        grads = self._grads(self.load(self.checkpoints[0][0]))
        self.n_params, self.width = grads.n_params, grads.width
        return self.n_params

    # ---- internals

    def fill_checkpoint(self, model: nn.Module, job: CheckpointJob) -> None:
        """Blocks from the projected features; the test features are held for the whole
        checkpoint, (n_test, width) in test order, and give the test norms."""
        grads = self._grads(model)
        self.n_params, self.width = grads.n_params, grads.width
        test_feats = None
        if job.te is not None:
            test_feats = self._all_features(grads, job.te, np.arange(job.te.n)).to(self.dtype)
            if job.need_test:
                job.put_test(_sq_norms(test_feats))
        for c in job.missing:
            job.put(c, self._block(grads, job.tr, job.chunks[c], test_feats))

    def _grads(self, model: nn.Module) -> FactorizedGrads:
        """The projected-gradient computer of one checkpoint."""
        return FactorizedGrads(model, self.k, self.seed, self.identity_projections, self.device)

    def _batches(self, data: EncodedData, rows: np.ndarray) -> Iterable[np.ndarray]:
        """Rows of ``data`` in forward+backward batches (width-sorted)."""
        if self.batch_size is not None:
            return data.batches(rows, self.batch_size)
        return data.token_batches(rows, TOKENS_PER_BATCH, MAX_ROWS)

    def _all_features(
        self, grads: FactorizedGrads, data: EncodedData, rows: np.ndarray
    ) -> torch.Tensor:
        """(len(rows), width) features of ``rows``, in the order of ``rows``."""
        out = torch.empty(len(rows), grads.width, device=self.device)
        where = {int(r): i for i, r in enumerate(rows)}
        for batch_rows in self._batches(data, rows):
            pos = torch.as_tensor([where[int(r)] for r in batch_rows], device=self.device)
            out[pos] = grads.features(data.take(batch_rows, self.device))
        return out

    def _block(
        self,
        grads: FactorizedGrads,
        tr: EncodedData,
        chunk: tuple[int, int],
        test_feats: torch.Tensor | None,
    ) -> np.ndarray:
        """Unweighted (n_test + 1, chunk) block: test × train dot products, squared norms last."""
        lo, hi = chunk
        n_test = 0 if test_feats is None else test_feats.shape[0]
        block = np.zeros((n_test + 1, hi - lo), dtype=np.float32)
        for rows in self._batches(tr, np.arange(lo, hi)):
            feats = grads.features(tr.take(rows, self.device)).to(self.dtype)
            block[-1, rows - lo] = _sq_norms(feats)
            if test_feats is not None:
                block[:n_test, rows - lo] = (test_feats @ feats.T).float().cpu().numpy()
        return block


def _sq_norms(feats: torch.Tensor) -> np.ndarray:
    """Squared norms of feature rows; float32 features as before, others as (f * f) summed in
    the features' dtype (what a bf16 dot product of a row with itself gives)."""
    if feats.dtype == torch.float32:
        return feats.square().sum(1).cpu().numpy()
    return (feats * feats).sum(1, dtype=feats.dtype).float().cpu().numpy()


def factorized_tracin(
    checkpoints: Sequence[tuple[str | os.PathLike | nn.Module, float]],
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor] | None = None,
    k: int = 32,
    seed: int = 0,
    **options: Any,
) -> TracInResult:
    """TracIn (n_test × n_train matrix, self-influence) with factorized projected gradients.

    ``options`` go to :class:`FactorizedTracIn` (device, batch_size, chunk_size, identity,
    loader) and to its ``compute`` (per_checkpoint, shard_dir, progress).
    """
    compute_keys = {"per_checkpoint", "shard_dir", "progress"}
    run_opts = {key: options.pop(key) for key in list(options) if key in compute_keys}
    engine = FactorizedTracIn(checkpoints, k, seed=seed, **options)
    return engine.compute(train, test, **run_opts)
