"""Score curves (paper Fig. 1): sorted TracIn curves of test instances."""

from ui.views import curves

curves.render()
