"""Scenario (c) a transformers Llama training step, stock checkpointing against gcoffload.

A thin entry point: the code ships in the package (gcoffload/bench/hf_step.py)
so that `python -m gcoffload bench` runs it from any directory. Run
`python benchmarks/bench_hf_step.py --help` for the options.
"""

from gcoffload.bench.hf_step import main

if __name__ == "__main__":
    main()
