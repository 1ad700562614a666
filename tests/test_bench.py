"""The benchmark suite: it runs end to end, every strategy computes the same step, the metrics add up,
its options are checked up front, noisy runs say so, and its figures show what was measured."""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import re
from collections.abc import Callable, Iterator

import pytest
import torch

import gcoffload
from gcoffload.__main__ import main
from gcoffload.bench import (
    autopilot,
    common,
    disk,
    hf_step,
    host_cost,
    noise,
    plots,
    stack_overlap,
    suite,
    swap,
)
from gcoffload.bench.decoder import LLAMA_1B, LLAMA_8B, SMOKE, build_stack, run_stack
from gcoffload.bench.stack_overlap import StackConfig
from gcoffload.bench.strategies import STRATEGIES
from gcoffload.engine import registry

ON_CPU = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run's stacks")

pytestmark = pytest.mark.usefixtures("users_device")


NOISY_HEADER = (
    "**noisy: these measurements scatter, or take over 3x as long as rows that do the same work (which "
    "the work cannot explain); rerun on an idle machine.**"
)
AUTOPILOT_RUNS = ["checkpoint", "offload", "autopilot 0%", "autopilot 40%", "autopilot 80%"]
# Step times of which the middle 60% spread 160% of the median: (260 - 100) / 100.
SCATTERED_MS = [100.0, 100.0, 250.0, 100.0, 300.0]


PROGRESS_LINE = re.compile(r"\[(\d+)/(\d+)\] \d+\.\d s  (.+)")


@ON_CPU
def test_python_m_gcoffload_bench_runs_the_cpu_smoke_suite(tmp_path, capsys):
    """The whole suite, in-process, at its smallest: what it writes, reports and prints (no timings)."""
    out = tmp_path / "results"
    threads = torch.get_num_threads()
    arguments = ["bench", "--out", str(out), "--disk-dir", str(tmp_path), "--warmup", "1", "--steps", "2"]
    assert main(arguments) == 0
    assert torch.get_num_threads() == threads, "the run's one torch thread is given back"
    printed = capsys.readouterr()
    assert printed.err.startswith("CPU smoke run: no GPU was found"), "the note comes first"
    progress = [match.groups() for match in map(PROGRESS_LINE.fullmatch, printed.err.splitlines()) if match]
    total = len(progress)
    assert [(int(index), int(of)) for index, of, _ in progress] == [(i, total) for i in range(1, total + 1)]
    labels = [label for _, _, label in progress]
    hf = [f"hf {mode}: {name}" for mode in ("full", "lora") for name in hf_step.STRATEGIES]
    assert labels == [
        "copy 1 MiB",
        "copy 4 MiB",
        "copy 16 MiB",
        *(f"stack smoke L=4 1x256: {name}" for name in STRATEGIES),
        *(hf if suite._hf_installed() else []),
        "autopilot smoke L=4 1x256: profile",
        *(f"autopilot smoke L=4 1x256: {name}" for name in AUTOPILOT_RUNS),
        "swap smoke L=4 1x256: profile",
        *(f"swap smoke L=4 1x256: {name}" for name in swap.RUNS),
        "disk: throughput of the raw disk and of the engine",
        *(f"disk smoke L=4 1x256: {name}" for name in disk.RUNS),
        *(f"host cost: set up {name}" for name in host_cost.VARIANTS),
        f"host cost: 20 interleaved steps of 6 variants, {host_cost.LAYERS} layers",
        "write results.json, summary.md and PNGs",
    ], "every phase is announced before it runs, the host cost's steps and the writing included"
    assert re.search(r"\ndone in \d+\.\d s\n$", printed.err)

    results = json.loads((out / "results.json").read_text())
    assert results["suite"] == "cpu-smoke" and results["note"] == suite.SMOKE_NOTE
    assert results["environment"]["smoke_run"] is True and results["environment"]["torch_threads"] == 1
    assert results["environment"]["torch"] == torch.__version__
    assert [row["size"] for row in results["copy_bandwidth"]] == ["1 MiB", "4 MiB", "16 MiB"]
    (stack,) = results["stacks"]
    assert stack["label"] == "smoke L=4 1x256"
    assert [row["strategy"] for row in stack["strategies"]] == list(STRATEGIES)
    for row in stack["strategies"]:
        assert row["step_ms"]["p20"] <= row["step_ms"]["median"] <= row["step_ms"]["p80"]
        assert "noisy" in row
    gcoffload_row = next(row for row in stack["strategies"] if row["strategy"] == "gcoffload-d1")
    assert gcoffload_row["host_allocations_after_warmup"] == 0
    assert gcoffload_row["offloads_per_step"] == 3 and gcoffload_row["prefetch_hits_per_step"] == 3
    assert any(entry["op"] == "offload" for entry in stack["timeline"])
    if suite._hf_installed():
        strategies = {(row["mode"], row["strategy"]) for row in results["hf_step"]["rows"]}
        assert ("lora", "gcoffload") in strategies and ("full", "hf-checkpoint") in strategies
    runs = results["autopilot"]["runs"]
    assert [row["run"] for row in runs] == AUTOPILOT_RUNS
    assert all(row["predicted_ms"] > 0 and row["plan"].startswith("gcoffload plan for") for row in runs[2:])
    assert "keep" not in runs[2]["modes"]  # the least-memory budget
    assert runs[2]["predicted_peak_bytes"] <= runs[2]["budget_bytes"]
    (bus,) = results["swap"]["buses"]  # the CPU's own bus, once
    assert [row["run"] for row in bus["runs"]] == list(swap.RUNS)
    assert bus["runs"][0]["vs_checkpoint"] == 1.0 and bus["budget_bytes"] > 0
    assert bus["runs"][3]["plan"].startswith("gcoffload plan for")
    assert "swap" not in bus["runs"][2]["modes"]
    assert bus["runs"][4]["host_peak_bytes"] > bus["runs"][1]["host_peak_bytes"] > 0
    host = {row["variant"]: row for row in results["host_cost"]["rows"]}
    assert (
        host["torch reentrant"]["vs_torch_same_path"]
        == host["torch non-reentrant"]["vs_torch_same_path"]
        == 1.0
    )
    assert "gcoffload reentrant + autopilot" in host
    assert results["host_cost"]["layers"] == host_cost.LAYERS and results["host_cost"]["steps"] == 20

    summary = (out / "summary.md").read_text()
    assert summary == suite._summary(results) + "\n" and printed.out.startswith(summary)
    assert "CPU smoke run" in summary and "| gcoffload-d1 |" in summary
    assert "### autopilot" in summary and "### host cost per checkpointed layer" in summary
    assert f"### disk tier, {tmp_path}" in summary
    assert f"wrote {out / 'results.json'}, {out / 'summary.md'}" in printed.out
    if importlib.util.find_spec("matplotlib"):
        assert (out / "timeline-0-smoke-1x256.png").stat().st_size > 10_000
        assert (out / "strategies-0-smoke-1x256.png").stat().st_size > 10_000


@ON_CPU
def test_the_disk_scenario_brings_every_tensor_back_and_trains_exactly_on_the_disk_tier(tmp_path):
    """The smoke disk scenario: the engine moves every tensor through the disk and back equal, the
    training runs' gradients equal those without checkpointing, and the settings are as before."""
    before = registry.settings()
    out, where = tmp_path / "results", tmp_path / "disk"
    where.mkdir()
    arguments = ["bench", "--scenarios", "disk", "--disk-dir", str(where), "--out", str(out)]
    assert main([*arguments, "--warmup", "1", "--steps", "2"]) == 0
    assert registry.settings() == before
    assert list(where.iterdir()) == [], "the disk tier's file has no name"

    result = json.loads((out / "results.json").read_text())["disk"]
    assert result["directory"] == str(where)
    throughput = result["throughput"]
    assert throughput["equal"] is True and throughput["all_on_disk"] is True
    assert throughput["bytes"] == disk.SMOKE_CONFIG.tensors * disk.SMOKE_CONFIG.tensor_bytes
    assert all(row["reads"] == disk.SMOKE_CONFIG.tensors for row in throughput["rounds"])
    assert throughput["write_vs_raw"] > 0 and throughput["read_vs_raw"] > 0
    runs = {row["run"]: row for row in result["training"]["runs"]}
    assert list(runs) == list(disk.RUNS)
    assert runs["RAM tier"]["gradients_equal"] and runs["disk tier"]["gradients_equal"]
    assert runs["RAM tier"]["offloads_per_step"] == 3 and runs["RAM tier"]["disk_spills_per_step"] == 0
    on_disk = runs["disk tier"]
    input_bytes = disk.SMOKE_CONFIG.stack.input_bytes(torch.float32)
    assert input_bytes == disk.SMOKE_CONFIG.host_budget_bytes, "one input fits the host budget"
    assert on_disk["offloads_per_step"] == 3 and on_disk["disk_spills_per_step"] == 2
    assert on_disk["written_bytes_per_step"] == 2 * input_bytes
    assert on_disk["read_bytes_per_step"] <= on_disk["written_bytes_per_step"]
    summary = (out / "summary.md").read_text()
    assert "| disk tier |" in summary and "| read |" in summary


def test_full_chooses_the_larger_cpu_sizes(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    suite.add_arguments(parser)
    cpu = torch.device("cpu")
    assert suite.select_suite(cpu, full=False) is suite.SMOKE_SUITE
    full = suite.select_suite(cpu, full=True)
    assert full is suite.CPU_FULL_SUITE and full.host_steps > suite.SMOKE_SUITE.host_steps
    args = parser.parse_args(["--full", "--tokens", "2x256"])
    assert [config.label for config in suite._stacks(full, suite.SCENARIOS, args, parser)] == [
        "smoke L=4 2x256"
    ]
    with pytest.raises(SystemExit):
        suite._stacks(suite.SMOKE_SUITE, suite.SCENARIOS, args, parser)
    assert "the CPU smoke run has no 2x256; choose from 1x256 (--full runs it)" in capsys.readouterr().err
    assert suite.select_suite(torch.device("cuda"), full=False) is suite.GPU_SUITE
    assert suite.select_suite(torch.device("cuda"), full=True) is suite.GPU_SUITE


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


@pytest.mark.parametrize("run", ["no checkpointing", "torch checkpoint", "reentrant", "non-reentrant"])
def test_the_timeline_tells_forward_from_recompute(run):
    stack = build_stack(SMOKE, layers=2, device=torch.device("cpu"), dtype=torch.float32)
    inputs = torch.randn(1, 8, SMOKE.hidden, requires_grad=True)
    strategy = {"no checkpointing": "none", "torch checkpoint": "checkpoint"}.get(run)
    with contextlib.ExitStack() as scope:
        if strategy is not None:
            forward = scope.enter_context(STRATEGIES[strategy].activate(stack))
        else:
            reentrant = run == "reentrant"
            scope.enter_context(
                gcoffload.wrap_layers(
                    stack, gcoffload.OffloadOptions(min_offload_bytes=0), use_reentrant=reentrant
                )
            )
            forward = functools.partial(run_stack, stack)
        with gcoffload.get_engine("cpu").trace() as trace:
            forward(inputs).sum().backward()
    labels = [label for _, _, label in plots.compute_intervals(trace)]
    if run == "no checkpointing":
        assert labels == ["F0", "F1"]
    elif run == "reentrant":
        assert labels == ["F0", "F1", "R1", "B1", "R0", "B0"]
    else:  # early stop: the recompute ends before the layer's end mark
        assert labels == ["F0", "F1", "R1+B1", "R0+B0"]


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
        {"op": "offload", "label": "", "start_ms": 1.0, "end_ms": 1.5, "handle_id": 1},
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
    stopped_early = [entry for entry in trace if entry["label"] != "recompute:1:end"]
    assert plots.compute_intervals(stopped_early)[2:] == [(3, 6, "R1+B1"), (6, 7, "R0"), (7, 7, "B0")]
    if importlib.util.find_spec("matplotlib"):
        (legend,) = plots.timeline(stopped_early, "step").legends
        entries = [text.get_text() for text in legend.get_texts()]
        assert "recompute stopped early, then backward (R+B)" in entries


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


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--steps", "0"], "argument --steps: must be a whole number >= 1, not '0'"),
        (["--steps", "many"], "argument --steps: must be a whole number >= 1, not 'many'"),
        (["--warmup", "-1"], "argument --warmup: must be a whole number >= 0, not '-1'"),
        (["--tokens", "9-9"], "argument --tokens: '9-9' is not BATCHxLENGTH, e.g. 4x2048"),
        (["--disk-dir", "/no/such/dir"], "argument --disk-dir: '/no/such/dir' is not a directory"),
        (["--shapes", "llama-2"], "argument --shapes: invalid choice: 'llama-2'"),
        (
            ["--scenarios", "copy", "--tokens", "2x256"],
            "--shapes and --tokens choose stacks, but --scenarios",
        ),
        pytest.param(
            ["--shapes", "llama-1b-like"],
            "argument --shapes: the CPU smoke run has no llama-1b-like; choose from smoke",
            marks=ON_CPU,
        ),
        pytest.param(
            ["--tokens", "9x9"],
            "argument --tokens: the CPU smoke run has no 9x9; choose from 1x256",
            marks=ON_CPU,
        ),
    ],
)
def test_bench_options_that_would_fail_or_run_nothing_are_usage_errors(options, message, tmp_path, capsys):
    out = tmp_path / "results"
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--out", str(out), *options])
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("usage: python -m gcoffload bench") and message in error
    assert not out.exists(), "nothing ran"


def test_bench_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("")
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(taken)])
    assert f"argument --out: '{taken}' is a file" in capsys.readouterr().err


def test_bench_refuses_the_transformers_step_without_transformers(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(suite, "_hf_installed", lambda: False)
    with pytest.raises(SystemExit):
        main(["bench", "--out", str(tmp_path / "results"), "--scenarios", "hf"])
    assert "argument --scenarios: hf needs transformers and peft" in capsys.readouterr().err


def test_the_gpu_suite_names_its_stacks_when_asked_for_one_it_lacks(capsys):
    parser = argparse.ArgumentParser(prog="bench")
    suite.add_arguments(parser)
    args = parser.parse_args(["--shapes", "llama-8b-like", "--tokens", "1x16384"])
    assert [config.label for config in suite._stacks(suite.GPU_SUITE, suite.SCENARIOS, args, parser)] == [
        "llama-8b-like L=32 1x16384"
    ]
    with pytest.raises(SystemExit):
        suite._stacks(suite.GPU_SUITE, suite.SCENARIOS, parser.parse_args(["--tokens", "9x9"]), parser)
    assert "the GPU suite has no 9x9; choose from 1x4096, 4x2048, 1x16384" in capsys.readouterr().err


def test_bench_help_is_plain_text_and_explains_every_option(capsys):
    with pytest.raises(SystemExit) as raised:
        main(["bench", "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and ":mod:" not in text
    assert "Writes results.json, summary.md and PNGs" in text
    parser = argparse.ArgumentParser()
    suite.add_arguments(parser)
    assert all(action.help for action in parser._actions), "every option has a help string"


def test_noisy_step_times_and_copies_too_slow_to_be_real_are_named():
    assert noise.diagnose([100.0, 102.0, 99.0, 101.0, 100.0], {"D2H": 12.5, "H2D": None}) is None
    assert noise.relative_spread(SCATTERED_MS) == pytest.approx(1.6)
    assert noise.diagnose(SCATTERED_MS) == "step times spread 160% > 20%"
    assert noise.diagnose(gbps={"D2H": 0.004, "H2D": 20.0}) == "D2H 0.00 GB/s < 0.1 GB/s"
    slow = {"raw D2H": 0.07, "raw H2D": 0.05, "engine D2H": 9.0}
    assert noise.diagnose([100.0], slow) == "raw D2H 0.07, raw H2D 0.05 GB/s < 0.1 GB/s"


def test_rows_that_do_the_same_work_yet_differ_beyond_what_the_work_allows_are_named():
    honest = {"none": 100.0, "checkpoint": 133.0, "naive": 199.0, "gcoffload-d1": 140.0}
    assert noise.implausible_rows(honest) == {}, "a recompute and exposed copies: at most about 2x"
    assert noise.implausible_rows({"none": 100.0, "checkpoint": 2400.0, "naive": 301.0}) == {
        "checkpoint": "step time 24.0x the fastest (none) > 3x for the same work",
        "naive": "step time 3.0x the fastest (none) > 3x for the same work",
    }
    assert noise.implausible_rows({"alone": 100.0}) == {}
    rows = [
        {"strategy": "checkpoint", "median_ms": 2400.0, "noisy": "step times spread 30% > 20%"},
        {"strategy": "none", "median_ms": 100.0, "noisy": None},
        {"strategy": "gcoffload-d1", "oom": True},
        {"strategy": "save_on_cpu", "median_ms": 900.0},
    ]
    noise.mark_implausible(rows, "strategy")
    assert [row.get("noisy") for row in rows] == [
        "step times spread 30% > 20%; step time 24.0x the fastest (none) > 3x for the same work",
        None,
        None,
        "step time 9.0x the fastest (none) > 3x for the same work",
    ]


def _steady_then_slow() -> Callable[..., list[float]]:
    """``common.time_steps`` of a run whose first row ran alone and whose later ones shared the cores:
    every row's own steps are steady, only the comparison across rows shows the machine was busy."""
    calls = itertools.count()
    return lambda *args, **kwargs: STEADY_MS if next(calls) == 0 else [24 * value for value in STEADY_MS]


STEADY_MS = [100.0, 101.0, 100.0, 99.0, 100.0]


def test_rows_of_one_stack_autopilot_and_mode_that_differ_24x_are_marked_noisy(monkeypatch):
    cpu, config = torch.device("cpu"), StackConfig(SMOKE, layers=2, batch=1, length=32)
    monkeypatch.setattr(common, "time_steps", _steady_then_slow())
    strategies = [STRATEGIES["checkpoint"], STRATEGIES["gcoffload-d1"]]
    stack = stack_overlap.run(config, strategies, cpu, torch.float32, warmup=0, steps=5)
    assert [row["noisy"] for row in stack["strategies"]] == [
        None,
        "step time 24.0x the fastest (checkpoint) > 3x for the same work",
    ]
    monkeypatch.setattr(common, "time_steps", _steady_then_slow())
    autopilot_result = autopilot.run(config, cpu, torch.float32, warmup=0, steps=5)
    runs = autopilot_result["runs"]
    assert [row["noisy"] for row in runs] == [None] + 4 * [
        "step time 24.0x the fastest (checkpoint) > 3x for the same work"
    ]
    results = {
        "environment": common.environment(cpu),
        "suite": "cpu-smoke",
        "stacks": [stack],
        "autopilot": autopilot_result,
    }
    reason = "step time 24.0x the fastest (checkpoint) > 3x for the same work"
    assert suite._noisy_measurements(results) == [
        f"smoke L=2 1x32 gcoffload-d1: {reason}",
        *(f"autopilot {name}: {reason}" for name in AUTOPILOT_RUNS[1:]),
    ]
    assert NOISY_HEADER in suite._summary(results)


@pytest.mark.hf
def test_the_strategies_of_one_transformers_mode_are_compared_with_each_other(monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    monkeypatch.setattr(common, "time_steps", _steady_then_slow())
    tiny = hf_step.HFConfig(32, 64, 2, 2, 1, 64, batch=1, length=8)
    rows = hf_step.run(tiny, torch.device("cpu"), torch.float32, warmup=0, steps=5)["rows"]
    measured = {(row["mode"], row["strategy"]): row.get("noisy") for row in rows if "median_ms" in row}
    reason = "step time 24.0x the fastest (hf-checkpoint) > 3x for the same work"
    assert measured == {
        ("full", "hf-checkpoint"): None,
        ("full", "gcoffload"): reason,
        ("lora", "hf-checkpoint"): None,  # 24x as slow as full fine-tuning, but not the same work
        ("lora", "gcoffload"): None,
    }


@pytest.fixture(scope="module")
def scattered_stack() -> Iterator[dict]:
    """A two-layer stack measured for real, except that every strategy's timed steps scatter."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(common, "time_steps", lambda *args, **kwargs: SCATTERED_MS)
        strategies = [STRATEGIES["checkpoint"], STRATEGIES["gcoffload-d1"]]
        config = StackConfig(SMOKE, layers=2, batch=1, length=32)
        yield stack_overlap.run(config, strategies, torch.device("cpu"), torch.float32, warmup=0, steps=5)


def test_a_noisy_run_is_marked_in_its_tables_and_summary(scattered_stack):
    assert all(
        row["noisy"].startswith("step times spread 160% > 20%") for row in scattered_stack["strategies"]
    )
    results = {
        "environment": common.environment(torch.device("cpu")),
        "suite": "cpu-smoke",
        "stacks": [scattered_stack],
    }
    summary = suite._summary(results)
    assert NOISY_HEADER in summary
    assert "- smoke L=2 1x32 checkpoint: step times spread 160% > 20%" in summary
    assert "| checkpoint | 100.0 | 100.0 | 260.0 | +0.0% |" in summary and "| noisy |" in summary

    steady = {
        **scattered_stack,
        "strategies": [{**row, "noisy": None} for row in scattered_stack["strategies"]],
        "raw_copy": {**scattered_stack["raw_copy"], "noisy": None},
    }
    assert "noisy:" not in suite._summary({**results, "stacks": [steady]})


def _suptitles(results: dict) -> dict[str, str]:
    return {name: figure.get_suptitle() for name, figure in suite._figures(results).items()}


def test_figures_of_a_cpu_run_say_so_and_leave_out_the_memory_it_did_not_measure(scattered_stack):
    cpu_run = {"environment": {"smoke_run": True}, "stacks": [scattered_stack]}
    assert _suptitles(cpu_run) == {
        "strategies-0-smoke-1x32.png": f"{suite.SMOKE_TITLE}: smoke L=2 1x32",
        "timeline-0-smoke-1x32.png": f"{suite.SMOKE_TITLE}: gcoffload-d1 step: smoke L=2 1x32",
    }
    gpu_run = {"environment": {"smoke_run": False}, "stacks": [scattered_stack]}
    assert not any("CPU" in title for title in _suptitles(gpu_run).values())

    on_the_cpu = plots.strategies(scattered_stack, "cpu")
    (time_axis,) = on_the_cpu.axes
    assert [text.get_text() for text in time_axis.get_legend().get_texts()] == [
        "noisy: rerun on an idle machine"
    ]
    measured = [
        {**row, "peak_bytes": 3 << 30, "held_after_forward_bytes": 1 << 30}
        for row in scattered_stack["strategies"]
    ]
    _, memory_axis = plots.strategies({**scattered_stack, "strategies": measured}, "gpu").axes
    legend = [text.get_text() for text in memory_axis.get_legend().get_texts()]
    assert legend == ["peak allocated", "held after forward"]


def test_the_timeline_shows_short_copies_fits_its_labels_and_explains_only_what_it_draws():
    def mark(label: str, at: float) -> dict:
        return {"op": "mark", "label": label, "start_ms": at, "end_ms": at}

    trace = [
        mark("forward:0:start", 0),
        mark("forward:0:end", 4),
        mark("forward:1:start", 4),
        mark("forward:1:end", 8),
        {"op": "offload", "label": "", "start_ms": 4.0, "end_ms": 4.001, "handle_id": 7},
        mark("recompute:1:start", 9),
        mark("recompute:1:end", 10),
        mark("recompute:0:start", 11),
        mark("recompute:0:end", 12),
    ]
    figure = plots.timeline(trace, "step")
    figure.draw_without_rendering()
    (axis,) = figure.axes
    bars = [patch.get_window_extent() for patch in axis.patches]
    (copy_bar,) = (bar for patch, bar in zip(axis.patches, bars, strict=True) if patch.get_center()[1] == 1)
    assert copy_bar.width >= 6, "a copy of 1 us in a 12 ms step is still a bar, not a hairline"
    labels = {text.get_text(): text.get_window_extent() for text in axis.texts}
    assert {"F0", "F1", "R1", "B1", "R0"} <= set(labels) and "B0" not in labels and "#7" not in labels
    for extent in labels.values():
        assert any(bar.x0 <= extent.x0 and extent.x1 <= bar.x1 for bar in bars), "a label stays in its bar"
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [
        "forward (F) / recompute (R) of a layer",
        "backward of a layer (B)",
        "offload to host (#handle)",
    ]
