"""Neighbourhoods (paper Fig. 2): [CLS] distances and a map of all instances."""

from ui.views import neighbourhoods

neighbourhoods.render()
