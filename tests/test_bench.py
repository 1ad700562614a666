"""The benchmark suite: it runs end to end, every strategy computes the same step, the metrics add up."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from gcoffload.bench import plots, stack_overlap
from gcoffload.bench.decoder import LLAMA_1B, LLAMA_8B, SMOKE, build_stack
from gcoffload.bench.stack_overlap import StackConfig
from gcoffload.bench.strategies import STRATEGIES


def test_python_m_gcoffload_bench_runs_the_cpu_smoke_suite(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "gcoffload", "bench", "--out", str(out), "--warmup", "1", "--steps", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "CPU smoke run" in result.stderr and "100%" in result.stderr, "the note and a progress bar"
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["smoke_run"] is True
    assert results["environment"]["torch"] == torch.__version__
    assert [row["size"] for row in results["copy_bandwidth"]] == ["1 MiB", "4 MiB", "16 MiB"]
    (stack,) = results["stacks"]
    assert [row["strategy"] for row in stack["strategies"]] == list(STRATEGIES)
    for row in stack["strategies"]:
        assert row["step_ms"]["p20"] <= row["step_ms"]["median"] <= row["step_ms"]["p80"]
    gcoffload_row = next(row for row in stack["strategies"] if row["strategy"] == "gcoffload-d1")
    assert gcoffload_row["host_allocations_after_warmup"] == 0
    assert gcoffload_row["offloads_per_step"] == 3 and gcoffload_row["prefetch_hits_per_step"] == 3
    assert any(entry["op"] == "offload" for entry in stack["timeline"])
    if importlib.util.find_spec("transformers"):
        strategies = {(row["mode"], row["strategy"]) for row in results["hf_step"]["rows"]}
        assert ("lora", "gcoffload") in strategies and ("full", "hf-checkpoint") in strategies
    summary = (out / "summary.md").read_text()
    assert "CPU smoke run" in summary and "| gcoffload-d1 |" in summary
    if importlib.util.find_spec("matplotlib"):
        assert (out / "timeline-0-smoke-2x256.png").stat().st_size > 10_000
        assert (out / "strategies-0-smoke-2x256.png").stat().st_size > 10_000


def test_every_strategy_computes_the_same_step():
    stack = build_stack(SMOKE, layers=3, device=torch.device("cpu"), dtype=torch.float32)
    inputs = torch.randn(2, 32, SMOKE.hidden, requires_grad=True)
    output_grad = torch.randn_like(inputs)
    results = {}
    for name, strategy in STRATEGIES.items():
        stack.zero_grad(set_to_none=True)
        inputs.grad = None
        with strategy.activate(stack) as forward:
            output = forward(inputs)
            output.backward(output_grad)
        results[name] = [output.detach(), inputs.grad, *(parameter.grad for parameter in stack.parameters())]
    for name, tensors in results.items():
        for tensor, expected in zip(tensors, results["none"], strict=True):
            assert torch.equal(tensor, expected), name


def test_exposed_copy_time_is_the_time_compute_waited_for_copies():
    def entry(op: str, start: float, end: float, nbytes: int = 0) -> dict:
        return {"op": op, "label": "", "start_ms": start, "end_ms": end, "nbytes": nbytes}

    trace = [
        entry("offload", 0.0, 2.0, nbytes=100_000_000),
        entry("fetch", 1.5, 2.0),
        entry("mark", 3.0, 3.0),
        entry("prefetch", 4.0, 8.0, nbytes=100_000_000),
        entry("fetch", 7.0, 8.0),
        entry("fetch", 9.0, 9.0),
    ]
    copies = {"offloads": 1, "prefetch_hits": 2, "on_demand_fetches": 0}
    metrics = stack_overlap._copy_metrics(trace, steps=1, copies=copies)
    assert metrics["copy_ms_per_step"] == pytest.approx(6.0)
    assert metrics["exposed_copy_ms_per_step"] == pytest.approx(1.5)
    assert metrics["d2h_gbps"] == pytest.approx(50.0) and metrics["h2d_gbps"] == pytest.approx(25.0)

    step = {"op": "mark", "label": stack_overlap.STEP_MARK, "start_ms": 0.0, "end_ms": 0.0}
    later = [{**item, "start_ms": item["start_ms"] + 10, "end_ms": item["end_ms"] + 10} for item in trace]
    two_steps = [step, *trace, {**step, "start_ms": 10.0, "end_ms": 10.0}, *later]
    averaged = stack_overlap._copy_metrics(two_steps, steps=2, copies=copies)
    assert averaged["copy_ms_per_step"] == pytest.approx(6.0)
    assert averaged["exposed_copy_ms_per_step"] == pytest.approx(1.5)
    assert stack_overlap.last_step(two_steps) == trace, "the timeline shows the last step, from its start"


def test_overhead_overlap_and_bandwidth_share_are_related_to_the_baseline():
    rows = [
        {"strategy": "checkpoint", "median_ms": 100.0},
        {
            "strategy": "gcoffload-d1",
            "median_ms": 103.0,
            "copy_ms_per_step": 10.0,
            "exposed_copy_ms_per_step": 2.5,
            "d2h_gbps": 45.0,
            "h2d_gbps": 40,
        },
        {"strategy": "none", "oom": True},
    ]
    stack_overlap._relate(rows, {"d2h_gbps": 50.0, "h2d_gbps": 50.0}, overlap=True)
    assert rows[1]["overhead_vs_checkpoint"] == pytest.approx(0.03)
    assert rows[1]["overlap_fraction"] == pytest.approx(0.75)
    assert rows[1]["d2h_vs_raw"] == pytest.approx(0.9) and rows[1]["h2d_vs_raw"] == pytest.approx(0.8)
    assert "overhead_vs_checkpoint" not in rows[2]


def test_timeline_intervals_come_from_the_layer_marks():
    def mark(label: str, at: float) -> dict:
        return {"op": "mark", "label": label, "start_ms": at, "end_ms": at}

    trace = [
        mark("forward:0:start", 0),
        mark("forward:0:end", 1),
        mark("forward:1:start", 1),
        mark("forward:1:end", 2),
        {"op": "offload", "label": "", "start_ms": 1.0, "end_ms": 1.5},
        mark("recompute:1:start", 3),
        mark("recompute:1:end", 4),
        mark("recompute:0:start", 6),
        mark("recompute:0:end", 7),
    ]
    assert plots.compute_intervals(trace) == [
        (0, 1, "F0"),
        (1, 2, "F1"),
        (3, 4, "R1"),
        (4, 6, "B1"),
        (6, 7, "R0"),
        (7, 7, "B0"),
    ]


def test_stacks_are_cut_to_the_layers_that_fit_in_device_memory():
    gib = 1 << 30
    long_8b = StackConfig(LLAMA_8B, LLAMA_8B.depth, 1, 16384)
    for config in (StackConfig(LLAMA_1B, LLAMA_1B.depth, 4, 2048), long_8b):
        assert config.fitted(torch.bfloat16, 79 * gib).layers == config.shape.depth
        assert config.fitted(torch.bfloat16, None) == config
    on_24_gib = long_8b.fitted(torch.bfloat16, 24 * gib).layers
    weights_and_grads = 4 * LLAMA_8B.parameters_per_layer
    assert 1 <= on_24_gib < 32 and on_24_gib * weights_and_grads < 24 * gib
    assert long_8b.fitted(torch.bfloat16, 4 * gib).layers == 0
