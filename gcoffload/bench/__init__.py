"""Benchmarks that ship with the package; ``python -m gcoffload bench`` runs the suite.

One module per scenario, sharing :mod:`.common` and :mod:`.noise` (which
measurements not to trust):

* :mod:`.copy_bandwidth` (a): raw pinned copies against the engine's.
* :mod:`.stack_overlap` (b): a Llama-shaped stack under every strategy of
  :mod:`.strategies`, with gcoffload's copies traced.
* :mod:`.hf_step` (c): a transformers Llama step, stock checkpointing against gcoffload.
* :mod:`.autopilot` (d): the memory-budget autopilot at three budgets against
  all-checkpoint and all-offload.
* :mod:`.host_cost` (e): the host cost per checkpointed layer against torch's checkpoint.

:mod:`.suite` runs them (a small smoke run without a GPU, ``--full`` for the
larger CPU sizes), reports each phase on stderr as it starts, and writes JSON,
a markdown summary and PNGs (:mod:`.plots`).
"""
