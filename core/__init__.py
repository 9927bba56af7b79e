"""Influence Atlas core: studies computed into the run store under ``cache/``.

This package never imports streamlit, and importing it (or ``core.store``,
``core.shapes``, ``core.metrics``) does not import torch, so the app can read
the run store with the same code that writes it.
"""

__version__ = "0.1.0"
