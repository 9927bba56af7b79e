"""The lesson: the three shapes in five steps, on the teaching run."""

from ui.screens import lesson

lesson.render()
