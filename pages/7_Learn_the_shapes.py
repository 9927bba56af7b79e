"""Learn the shapes: S, Z and backslash curves from the run's own data, and a guessing exercise."""

from ui.screens import learn

learn.render()
