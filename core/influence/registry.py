"""Which engine computes a ``--project`` spec: the engine family's registry.

A spec is parsed torch-free by :func:`core.options.tracin_options.projection` into one of
:data:`core.options.tracin_options.PROJECTIONS`; :data:`ENGINES` maps that entry's ``mode`` to the
engine class, and :func:`engine_for` builds it. The run stage, the approximation study, the
error study and detector 2's retraining all build their engines here.

A new projection is one engine class (an :class:`~core.influence.base.Engine`), its
:class:`~core.options.tracin_options.Projection` entry (how it is typed, recorded and described in
the help), its line below, and their tests.
"""

from __future__ import annotations

from typing import Any

from core.influence.base import Checkpoints, Engine
from core.influence.engine import TracInCP
from core.influence.factorized import FactorizedTracIn
from core.options.tracin_options import DENSE, FACTORIZED, projection
from core.storage.errors import AtlasError

# Keyed by Projection.mode; every entry of PROJECTIONS has one (a test checks).
ENGINES: dict[str, type[Engine]] = {
    DENSE.mode: TracInCP,  # no projection (exact) or the dense one, of any scope
    FACTORIZED.mode: FactorizedTracIn,
}


def engine_class(project: int | str | None) -> type[Engine]:
    """The engine class of a projection spec (None: no projection, the exact engine)."""
    return ENGINES[DENSE.mode if project is None else projection(project)[0].mode]


def engine_for(
    checkpoints: Checkpoints,
    scope: str,
    project: int | str | None,
    seed: int = 0,
    **options: Any,
) -> Engine:
    """The engine of a projection spec over ``checkpoints``: exact or dense for none or a
    dimension D, the factorized one for ``factorized:K`` (which takes scope 'all' only).

    ``options`` (device, dtype, chunk_size, loader, ...) go to the engine's constructor.
    """
    if project is None:
        return ENGINES[DENSE.mode].from_projection(checkpoints, scope, None, seed, **options)
    entry, dim = projection(project)
    if entry.every_parameter and scope != "all":
        raise AtlasError(
            f"--project {entry.record(dim)} covers every parameter; use --params all "
            f"(got '{scope}')."
        )
    return ENGINES[entry.mode].from_projection(checkpoints, scope, dim, seed, **options)
