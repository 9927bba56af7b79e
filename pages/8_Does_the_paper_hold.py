"""Does the paper hold? The claims × conditions grid of the replication study."""

from ui.screens import replication

replication.render()
