"""Neighbourhoods (paper Fig. 2): [CLS] distances and a map of all instances."""

from ui.screens import neighbourhoods

neighbourhoods.render()
