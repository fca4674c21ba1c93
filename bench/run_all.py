"""Regenerate every benchmark section this package owns in docs/benchmarks.md, one at a time:

    nice -n 10 python -m d3po_studio.bench.run_all      # ~35 min on 2 shared CPU cores

memory (each configuration in its own process; also writes the GPU estimate), then latency
(on the embedded model when its weights exist).
"""
from . import latency, memory


def main() -> None:
    memory.main([])
    latency.main([])


if __name__ == "__main__":
    main()
