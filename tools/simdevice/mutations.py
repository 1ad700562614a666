"""Proves that the stream-ordering tests catch the removal of each ordering point of the copy engine.

Each mutant is gcoffload with one ordering point of its C++ copy engine, host
pool or disk tier taken out (a stream wait, or a wait for a fence before memory is reused).
For each one the script copies ``gcoffload/`` and ``csrc/`` into a temporary
directory (the layout of a source checkout, so the copy builds its extension
from its own patched ``csrc``), applies one exact text edit, builds the
extension, and runs the stream-ordering tests on the simulated device (the
engine's; swap's, whose storages travel through the same orderings; and the
disk tier's, whose writes and reads join them) with the copy first on
``PYTHONPATH``. Every mutant must make a test fail (or crash,
or hang past the timeout). The unmutated code runs first with the same tests and
must pass.

Run from the repository root (Python 3.11+, for ``python -P``):

    python tools/simdevice/mutations.py                    # baseline, then every mutant
    python tools/simdevice/mutations.py --list             # the mutants, nothing run
    python tools/simdevice/mutations.py --only source-held --only h2d-waits-d2h
    python tools/simdevice/mutations.py --first-failure    # pytest -x: faster, for CI
    python tools/simdevice/mutations.py --tests "tests/test_engine.py -m simdev"

It prints a markdown table and exits 0 only if the baseline passed and every
mutant was caught. Each mutant builds the extension afresh (about a minute);
the build is deleted from gcoffload's cache afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TEST_SELECTION = (
    "tests/test_stream_ordering.py tests/test_engine.py tests/test_swap.py tests/test_disk.py -m simdev"
)
TIMEOUT_S = 900  # per build and per test run; a test run killed at it counts as caught (hung)
SHOWN_FAILURES = 3
OUTPUT_TAIL_LINES = 40

# Run with `python -P -c`: prints where gcoffload and its C++ sources were found
# and where their build goes, then builds (or loads) the extension.
_BUILD_SCRIPT = """\
import gcoffload
from gcoffload.engine import extension as _ext
info = _ext.extension_info()
print(gcoffload.__file__, info.source_dir, info.build_dir, sep="\\n", flush=True)
_ext.load()
"""


@dataclass(frozen=True)
class Mutant:
    name: str
    removes: str
    path: str
    original: str
    replacement: str


MUTANTS = (
    Mutant(
        name="h2d-waits-d2h",
        removes="The H2D copy no longer waits for the D2H copy that filled the host buffer.",
        path="csrc/copy_engine.cpp",
        original="handle.d2h_done_.block(h2d_stream_);",
        replacement="",
    ),
    Mutant(
        name="h2d-waits-compute",
        removes="The H2D copy no longer waits for the compute stream after allocating its destination there.",
        path="csrc/copy_engine.cpp",
        original="Fence::record(compute_stream()).block(h2d_stream_);",
        replacement="",
    ),
    Mutant(
        name="compute-waits-h2d",
        removes="Fetch no longer makes the compute stream wait for the H2D copy.",
        path="csrc/copy_engine.cpp",
        original="fence.block(compute);",
        replacement="",
    ),
    Mutant(
        name="d2h-waits-compute",
        removes="The D2H copy no longer waits for the compute stream's work that produced the source.",
        path="csrc/copy_engine.cpp",
        original="Fence::record(compute_stream()).block(d2h_stream_);",
        replacement="",
    ),
    Mutant(
        name="write-waits-d2h",
        removes="The disk tier writes a staging buffer without waiting for the D2H copy that fills it.",
        path="csrc/disk_tier.cpp",
        original="filled.synchronize();",
        replacement="",
    ),
    Mutant(
        name="h2d-waits-read",
        removes="An H2D copy queued behind a disk read no longer waits for the read's outcome.",
        path="csrc/copy_engine.cpp",
        original="after.synchronize();",
        replacement="",
    ),
    Mutant(
        name="pool-reuse-waits-fence",
        removes="A released host buffer is reusable at once, before the last copy touching it has finished.",
        path="csrc/pinned_pool.cpp",
        original="return !entry.second.done();",
        replacement="return false;",
    ),
    Mutant(
        name="source-held",
        removes="A copy's device tensor is freed at once, not kept until the copy's fence is done.",
        path="csrc/copy_engine.cpp",
        original="if (fence.done()) {",
        replacement="if (true) {",
    ),
)


class MutantDrift(RuntimeError):
    """A mutant's original text is not in the code exactly once: the code changed under it."""


class BuildError(RuntimeError):
    """A copy's extension did not build, or the build did not use the copy."""


@dataclass(frozen=True)
class Build:
    package_file: Path
    source_dir: Path
    build_dir: Path


@dataclass(frozen=True)
class ProcessRun:
    returncode: int | None  # None: killed at the timeout
    output: str
    seconds: float

    @property
    def failing_tests(self) -> list[str]:
        return re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", self.output, flags=re.MULTILINE)

    @property
    def outcome(self) -> str:
        if self.returncode is None:
            return f"hung: timed out after {TIMEOUT_S} s"
        if self.returncode < 0:
            return f"crashed: {signal.Signals(-self.returncode).name}"
        return {0: "passed", 1: "failed"}.get(self.returncode, f"pytest exit status {self.returncode}")

    @property
    def caught(self) -> bool:
        """Failed, crashed or hung; a run that pytest could not start catches nothing."""
        return self.returncode is None or self.returncode < 0 or self.returncode == 1


def mutated_text(mutant: Mutant, text: str) -> str:
    count = text.count(mutant.original)
    if count != 1:
        raise MutantDrift(
            f"mutant {mutant.name}: {mutant.original!r} occurs {count} times in {mutant.path}, "
            "expected exactly once; update the mutant to the current code"
        )
    return text.replace(mutant.original, mutant.replacement)


def check_mutants_apply(mutants: list[Mutant]) -> None:
    for mutant in mutants:
        mutated_text(mutant, (REPO_ROOT / mutant.path).read_text())


def copy_sources(tree: Path) -> None:
    for directory in ("gcoffload", "csrc"):
        shutil.copytree(REPO_ROOT / directory, tree / directory, ignore=shutil.ignore_patterns("__pycache__"))


def apply_mutant(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    path.write_text(mutated_text(mutant, path.read_text()))


def environment(tree: Path) -> dict[str, str]:
    """This process's environment with `tree` first on the import path, ahead of the editable install."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def run(command: list[str], tree: Path) -> ProcessRun:
    """Runs `command` in the repository root on `tree`'s gcoffload; kills its process group at the timeout."""
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        env=environment(tree),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        returncode = None
    return ProcessRun(returncode, output, time.monotonic() - start)


def build(tree: Path, label: str) -> Build:
    """Builds `tree`'s extension and checks that `tree`'s gcoffload and sources are the ones used."""
    # -P: the working directory (the repository root) does not go first on the import path.
    attempt = run([sys.executable, "-P", "-c", _BUILD_SCRIPT], tree)
    lines = attempt.output.splitlines()
    if attempt.returncode != 0 or len(lines) < 3:
        raise BuildError(f"{label}: building the extension failed:\n{tail(attempt.output)}")
    located = Build(*(Path(line) for line in lines[:3]))
    if not located.package_file.is_relative_to(tree) or located.source_dir != tree / "csrc":
        raise BuildError(
            f"{label}: the subprocess imported gcoffload from {located.package_file} with sources in "
            f"{located.source_dir}, not the copy in {tree}"
        )
    return located


def run_tests(tree: Path, selection: str, first_failure: bool) -> ProcessRun:
    command = [sys.executable, "-P", "-m", "pytest", *shlex.split(selection)]
    command += ["-q", "-rfE", "-p", "no:cacheprovider", f"--rootdir={REPO_ROOT}"]
    if first_failure:
        command.append("-x")
    return run(command, tree)


def tail(output: str) -> str:
    return "\n".join(output.splitlines()[-OUTPUT_TAIL_LINES:])


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_baseline(selection: str, first_failure: bool) -> tuple[ProcessRun, Path]:
    """Runs the tests on an unmutated copy; returns the run and the build directory it used."""
    with tempfile.TemporaryDirectory(prefix="gcoffload-baseline-") as directory:
        tree = Path(directory)
        copy_sources(tree)
        baseline_build = build(tree, "baseline")
        progress(f"baseline: gcoffload imported from {baseline_build.package_file}")
        return run_tests(tree, selection, first_failure), baseline_build.build_dir


def run_mutant(mutant: Mutant, selection: str, first_failure: bool, baseline_build_dir: Path) -> ProcessRun:
    """Builds and tests one mutant, then deletes its tree and its build."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"gcoffload-{mutant.name}-") as directory:
        tree = Path(directory)
        copy_sources(tree)
        apply_mutant(mutant, tree)
        mutant_build = build(tree, f"mutant {mutant.name}")
        if mutant_build.build_dir == baseline_build_dir:
            raise BuildError(f"mutant {mutant.name}: builds into the baseline's {baseline_build_dir}")
        try:
            tests = run_tests(tree, selection, first_failure)
        finally:
            shutil.rmtree(mutant_build.build_dir, ignore_errors=True)
    return ProcessRun(tests.returncode, tests.output, time.monotonic() - start)


def markdown_cell(text: str) -> str:
    return text.replace("|", "\\|")


def result_cell(tests: ProcessRun) -> str:
    if not tests.caught:
        return "NOT caught" if tests.returncode == 0 else f"ERROR ({tests.outcome})"
    return "caught" if tests.returncode == 1 else f"caught ({tests.outcome})"


def failures_cell(tests: ProcessRun) -> str:
    failing = tests.failing_tests
    if not failing:
        return "none"
    shown = ", ".join(f"`{test_id}`" for test_id in failing[:SHOWN_FAILURES])
    more = ", ..." if len(failing) > SHOWN_FAILURES else ""
    return f"{len(failing)}: {shown}{more}"


def table(results: list[tuple[Mutant, ProcessRun]]) -> str:
    rows = [
        "| mutant | ordering point removed | result | failing tests | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mutant, tests in results:
        cells = [
            mutant.name,
            mutant.removes,
            result_cell(tests),
            failures_cell(tests),
            f"{tests.seconds:.0f}",
        ]
        rows.append("| " + " | ".join(markdown_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument(
        "--only",
        action="append",
        choices=[mutant.name for mutant in MUTANTS],
        metavar="NAME",
        help="run this mutant only (repeatable)",
    )
    parser.add_argument("--first-failure", action="store_true", help="stop each run at its first failure")
    parser.add_argument(
        "--tests",
        default=TEST_SELECTION,
        help=f"pytest arguments selecting the tests (default: {TEST_SELECTION})",
    )
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    if arguments.list:
        for mutant in MUTANTS:
            print(f"{mutant.name:24} {mutant.removes}")
        return 0
    mutants = [mutant for mutant in MUTANTS if arguments.only is None or mutant.name in arguments.only]
    check_mutants_apply(mutants)
    start = time.monotonic()

    progress(f"baseline: pytest {arguments.tests}")
    baseline, baseline_build_dir = run_baseline(arguments.tests, arguments.first_failure)
    if baseline.returncode != 0:
        print(f"{tail(baseline.output)}\n\nbaseline: the unmutated code did not pass ({baseline.outcome})")
        return 1
    progress(f"baseline: passed in {baseline.seconds:.0f} s")

    results = []
    for mutant in mutants:
        progress(f"{mutant.name}: building and testing")
        tests = run_mutant(mutant, arguments.tests, arguments.first_failure, baseline_build_dir)
        progress(f"{mutant.name}: {result_cell(tests)} in {tests.seconds:.0f} s")
        if not tests.caught and tests.returncode != 0:
            progress(tail(tests.output))
        results.append((mutant, tests))

    print(table(results))
    print(f"\nbaseline passed in {baseline.seconds:.0f} s; total {time.monotonic() - start:.0f} s")
    return 0 if all(tests.caught for _, tests in results) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (MutantDrift, BuildError) as error:
        sys.exit(f"mutations.py: {error}")
