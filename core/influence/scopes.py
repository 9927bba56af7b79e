"""Parameter scopes: which parameters of a model TracIn differentiates (see core.influence)."""

from __future__ import annotations

import re

from torch import nn

from core.options.tracin_options import parse_scope
from core.storage.errors import AtlasError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def word_embedding_name(model: nn.Module) -> str | None:
    """Name of the word-embedding matrix parameter (None if the model has none)."""
    try:
        weight = model.get_input_embeddings().weight
    except (AttributeError, NotImplementedError):
        return None
    for name, param in model.named_parameters():
        if param is weight:
            return name
    return None


def select_parameters(model: nn.Module, scope: str) -> list[tuple[str, nn.Parameter]]:
    """Return the (name, parameter) pairs of ``scope``, in the model's order.

    Raises :class:`AtlasError` for an unknown scope or one that selects nothing.
    """
    kind, n_last = parse_scope(scope)
    named = [(n, p) for n, p in model.named_parameters()]
    word = word_embedding_name(model)
    embed_prefix = word.rsplit(".", 2)[0] + "." if word and word.count(".") >= 2 else None
    base = getattr(model, "base_model_prefix", "") or ""
    if kind == "all":
        chosen = named
    elif kind == "no-word-embeddings":
        chosen = [(n, p) for n, p in named if n != word]
    elif kind == "head":
        # Parameters outside the base encoder: the classification layer.
        chosen = [(n, p) for n, p in named if not (base and n.startswith(base + "."))]
    else:
        layers = {int(m.group(1)) for n, _ in named if (m := _LAYER_RE.search(n))}
        if not layers:
            raise AtlasError(f"Scope '{scope}' needs encoder layers, but the model has none.")
        if n_last > len(layers):
            raise AtlasError(
                f"Scope '{scope}' asks for {n_last} layers but the model has {len(layers)}."
            )
        keep = set(sorted(layers)[-n_last:])
        chosen = []
        for n, p in named:
            m = _LAYER_RE.search(n)
            if m:
                if int(m.group(1)) in keep:
                    chosen.append((n, p))
            elif not (n == word or (embed_prefix and n.startswith(embed_prefix))):
                chosen.append((n, p))  # pooler and classifier
    if not chosen:
        raise AtlasError(f"Scope '{scope}' selects no parameters of this model.")
    return chosen
