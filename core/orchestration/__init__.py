"""The orchestration layer: a run stage by stage (pipeline), noise sweeps over many runs, and
the jobs the app starts, queues and watches.
"""
