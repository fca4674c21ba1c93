"""Benchmarks of D3PO Studio: memory of one update (ours vs the official recipe), latency of a
click on the embedded model, a GPU memory estimate, and the split-gradient update.

Regenerate every figure in docs/benchmarks.md from the repository root with

    nice -n 10 python -m d3po_studio.bench.run_all

(see docs/benchmarks.md for what each part measures and how long it takes).
"""
