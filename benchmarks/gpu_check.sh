#!/usr/bin/env bash
# GPU validation in three parts, each sized for one command of the device tool: the
# time limits of a part's steps add up to at most 9 minutes, of all three to under 25,
# and a part returns at most 8 files. The parts come in order of what they prove:
# where device time allows only some of them, run a first.
#
#   bash benchmarks/gpu_check.sh a   build, CUDA tests, copy bandwidth, Llama-1B-like stacks,
#                                    the transformers step
#   bash benchmarks/gpu_check.sh b   Llama-8B-like stacks at 1x4096 and 4x2048, the autopilot
#                                    at three budgets and the host cost per layer
#   bash benchmarks/gpu_check.sh c   the Llama-8B-like stack at 1x16384, swap at the least memory
#
# Run from the repository root, with the torch of the machine (no install needed:
# the package is imported from the checkout and builds its extension on first use,
# into .gcoffload-cache/, which later parts on the same machine reuse). Each part
# works in gpu-check/<part>/ and leaves in $OUT (default: gpu-check/) only what the
# device tool brings back: the bundle <part>.tar.gz and copies of its summaries. Each
# scenario runs as its own command with its own time limit, so one that overruns
# leaves the others' results intact.
set -uo pipefail

part="${1:-}"
out_root="${OUT:-gpu-check}"
out="gpu-check/$part"
export GCOFFLOAD_CACHE_DIR="${GCOFFLOAD_CACHE_DIR:-$PWD/.gcoffload-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-python3}"
rm -rf "$out"
mkdir -p "$out" "$out_root"
status=0

# step NAME SECONDS COMMAND...: runs one step under a time limit, logging into $out/NAME.log.
step() {
  local name="$1" seconds="$2"
  shift 2
  echo "== $name (limit ${seconds}s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc after $((SECONDS - start))s"
  tail -n 5 "$out/$name.log"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# bench NAME SECONDS ARGS...: one benchmark run into $out/NAME/.
bench() {
  local name="$1" seconds="$2"
  shift 2
  step "$name" "$seconds" "$python" -m gcoffload bench --out "$out/$name" "$@"
}

bundle_and_exit() {
  for summary in "$out"/*/summary.md; do
    [ -e "$summary" ] && cp "$summary" "$out_root/$part-$(basename "$(dirname "$summary")")-summary.md"
  done
  tar czf "$out_root/$part.tar.gz" -C "$out" .
  echo "wrote $out_root/$part.tar.gz"
  exit "$status"
}

case "$part" in
  a | b | c)
    # Every part builds first (instant once built): the machine may be a fresh one. A
    # build cut off by its time limit would leave a lock that later steps wait on.
    step build 80 "$python" -m gcoffload build || bundle_and_exit
    ;;&
  a)
    step versions 30 "$python" -m gcoffload info
    step cuda-tests 110 "$python" -m pytest -m cuda -q -p no:cacheprovider tests
    bench copy 45 --scenarios copy
    bench stacks-1b 150 --scenarios stack --shapes llama-1b-like
    bench hf 100 --scenarios hf
    ;;
  b)
    bench stacks-8b-short 300 --scenarios stack --shapes llama-8b-like --tokens 1x4096 4x2048
    bench autopilot 120 --scenarios autopilot host
    ;;
  c)
    bench stacks-8b-long 380 --scenarios stack --shapes llama-8b-like --tokens 1x16384
    bench swap 80 --scenarios swap --warmup 3 --steps 5
    ;;
  *)
    echo "usage: $0 a|b|c" >&2
    exit 2
    ;;
esac
bundle_and_exit
