#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ through `cargo afl` (stable toolchain): builds the targets
# in fuzz/ with instrumentation, runs each from its seed corpus (fuzz/seeds/TARGET), then reports
# executions and crashes per target. Any crash fails, and its input is kept under
# fuzz/out/TARGET/default/crashes (rerun one: fuzz/target/release/TARGET < FILE).
#
#   scripts/fuzz.sh time SECONDS [TARGET...]   each target for SECONDS   (make fuzz-smoke)
#   scripts/fuzz.sh execs N [TARGET...]        each target for about N executions (make fuzz)
set -euo pipefail
cd "$(dirname "$0")/.."
AFL_VERSION=0.18.2
mode=${1:?time SECONDS or execs N}
amount=${2:?how long}
shift 2
targets=("$@")
(( ${#targets[@]} )) || targets=(request stream_guard sse_usage sniff compile report admission)
case $mode in
  time) limit=(-V "$amount") ;;
  execs) limit=(-E "$amount") ;;
  *) echo "mode: time or execs" >&2; exit 2 ;;
esac

if [[ "$(cargo afl --version 2>/dev/null)" != *"$AFL_VERSION"* ]]; then
  cargo install --locked cargo-afl --version "$AFL_VERSION"
fi
# The AFL++ runtime for this rustc (built once; `--build` refuses when it is there already).
cargo afl config --build >/dev/null 2>&1 || cargo afl config --build --force >/dev/null 2>&1 || true
(cd fuzz && cargo afl build --release --locked --bins)

# Core dumps piped to a helper, or a CPU governor, would otherwise stop afl-fuzz from starting.
export AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_QUIET=1
failed=0
printf '%-14s %14s %10s %8s %s\n' target execs execs/s crashes result
for t in "${targets[@]}"; do
  out=fuzz/out/$t
  rm -rf "$out"
  mkdir -p "$out"
  cargo afl fuzz "${limit[@]}" -i "fuzz/seeds/$t" -o "$out" "fuzz/target/release/$t" >"$out/afl.log" 2>&1 || {
    tail -20 "$out/afl.log" >&2
    echo "afl-fuzz failed for $t" >&2
    exit 1
  }
  stats=$out/default/fuzzer_stats
  field() { sed -n "s/^$1 *: *//p" "$stats"; }
  execs=$(field execs_done) speed=$(field execs_per_sec) crashes=$(field saved_crashes)
  result=ok
  if (( crashes > 0 )); then
    result="CRASH: $(ls "$out"/default/crashes/id:* | head -3 | tr '\n' ' ')"
    failed=1
  elif [[ $mode == execs ]] && (( execs < amount )); then
    result="fewer than $amount executions"
  fi
  printf '%-14s %14s %10s %8s %s\n' "$t" "$execs" "$speed" "$crashes" "$result"
done
exit "$failed"
