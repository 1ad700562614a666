"""Scenario (b) stream overlap: a Llama-shaped stack under every strategy.

A thin entry point: the code ships in the package (gcoffload/bench/stack_overlap.py)
so that `python -m gcoffload bench` runs it from any directory. Run
`python benchmarks/bench_stack_overlap.py --help` for the options.
"""

from gcoffload.bench.stack_overlap import main

if __name__ == "__main__":
    main()
