"""The execution layer: independent tasks run here, in a process pool or on Ray (torch-free).

It knows the run store (tasks write there and are skipped when done) and nothing above it;
the engines, the detectors, the cleaning lab and the sweep describe their tasks to it.
"""
