"""Speed of vqbatch against the diffusers reference, run by `python -m benchmarks.run <name>` (never by the tests).

Each benchmark runs vqbatch and its reference in one process, on the same random weights and the same inputs, and
writes its results as JSON and as a markdown table (see docs/performance.md).
"""
