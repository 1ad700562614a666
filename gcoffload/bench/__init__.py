"""Benchmarks that ship with the package; ``python -m gcoffload bench`` runs the suite.

One module per scenario, sharing :mod:`.common` and :mod:`.noise` (which
measurements not to trust):

* :mod:`.copy_bandwidth` (a): raw pinned copies against the engine's.
* :mod:`.stack_overlap` (b): a Llama-shaped stack under every strategy of
  :mod:`.strategies`, with gcoffload's copies traced.
* :mod:`.hf_step` (c): a transformers Llama step, stock checkpointing against gcoffload.

:mod:`.suite` runs them and writes JSON, a markdown summary and PNGs (:mod:`.plots`).
"""
