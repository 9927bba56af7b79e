"""Noise sweep (paper Fig. 4-5): accuracy and loss against the flip rate."""

from ui.screens import sweep

sweep.render()
