"""Does the paper hold? The claims × conditions grid of the replication study."""

from ui.views import replication

replication.render()
