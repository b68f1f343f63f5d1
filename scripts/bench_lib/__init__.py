"""Helpers of ``scripts/bench``: each module measures one side of a comparison in its own process.

``scripts/bench`` (the orchestrator) starts every measurement as ``python -m bench_lib.<module>
<function> <json arguments>`` and reads one JSON line back (``common.emit``), so no measurement
shares an interpreter, a background thread or an aggregator with another.
"""
