"""Shape vs position (paper Fig. 3): S-shapedness against where the flips sit."""

from ui.views import shape

shape.render()
