"""The one exception type that reaches the user as a sentence, not a traceback."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class AtlasError(Exception):
    """A problem with the user's input or the run store, stated in one clear sentence.

    The CLI prints ``str(error)`` to stderr and exits with status 2; nothing else
    should catch it. Raise it before writing anything, so a bad input leaves no files.
    """


def choose(
    registry: Mapping[str, T],
    name: str,
    what: str,
    listed: Iterable[str] | None = None,
    hint: str = "",
) -> T:
    """``registry[name]``, or the refusal naming ``what`` and the valid names (``listed``,
    by default the registry's own order); ``hint`` ends the sentence."""
    try:
        return registry[name]
    except KeyError:
        names = ", ".join(registry if listed is None else listed)
        raise AtlasError(f"Unknown {what} '{name}'; choose one of: {names}{hint}.") from None
