"""Scenario (a) copy bandwidth: raw pinned copies against the engine's.

A thin entry point: the code ships in the package (gcoffload/bench/copy_bandwidth.py)
so that `python -m gcoffload bench` runs it from any directory. Run
`python benchmarks/bench_copy_bandwidth.py --help` for the options.
"""

from gcoffload.bench.copy_bandwidth import main

if __name__ == "__main__":
    main()
