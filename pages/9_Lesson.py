"""The lesson: the three shapes in five steps, on the teaching run."""

from ui.views import lesson

lesson.render()
