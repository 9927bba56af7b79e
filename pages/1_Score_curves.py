"""Score curves (paper Fig. 1): sorted TracIn curves of test instances."""

from ui.screens import curves

curves.render()
