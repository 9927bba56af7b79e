"""Shape vs position (paper Fig. 3): S-shapedness against where the flips sit."""

from ui.screens import shape

shape.render()
