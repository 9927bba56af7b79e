"""Influence Atlas core: studies computed into the run store under ``cache/``.

This package never imports streamlit, and importing it (or ``core.storage.store``,
``core.analysis.shapes``, ``core.analysis.metrics``) does not import torch, so the app can read
the run store with the same code that writes it.
"""

import os

# OpenMP threads that spin while waiting make torch 10-50x slower whenever another
# process shares the cores (measured on the project's 2-core machines); passive
# waiting costs nothing when the machine is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
