"""Local launchers: start and stop a vLLM process with compose.yaml's flags (``serve``, ``demo``).

Why apart from ``serving``: these start processes and read the compose file;
``serving`` holds only HTTP clients of a running server. The dependency runs
one way: ``launch`` uses ``serving``'s probe and smoke test, never the reverse.
Nothing here imports vLLM; it only spawns it.
"""
