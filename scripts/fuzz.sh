#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for a bounded time, one after another, one libFuzzer
# job each, and prints per target the executions, the corpus size and any finding.
#
#   scripts/fuzz.sh                       # every target, 60 s each
#   scripts/fuzz.sh 300                   # every target, 300 s each
#   scripts/fuzz.sh 60 handshake=600      # every target 60 s, handshake 600 s
#   scripts/fuzz.sh 0 presence=120        # only the targets named, for their time
#   FUZZ_SECONDS=30 scripts/fuzz.sh       # the default time from the environment
#
# Seeds come from fuzz/seeds/TARGET and tokens from fuzz/dicts/TARGET.dict (both
# committed). What the fuzzer learns stays in fuzz/corpus/TARGET, crashes go to
# fuzz/artifacts/TARGET and each run's log to fuzz/artifacts/TARGET.log (all ignored by
# git). Exits 1 if any target found something or failed, 2 on a usage or build error.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain
# accept them. FUZZ_SANITIZER (default address) picks the sanitizer: none runs faster.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1

seconds=${FUZZ_SECONDS:-60}
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
  seconds=$1
  shift
fi
sanitizer=${FUZZ_SANITIZER:-address}

# The longest input each target gets: a whole frame for the rendezvous messages, one
# request line for the control socket, a few transport messages for a session.
max_len() {
  case $1 in
    rendezvous_request | rendezvous_response) echo 32768 ;;
    transport) echo 16384 ;;
    control_rpc) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

if [[ $seconds -eq 0 && $# -eq 0 ]]; then
  echo "usage: $0 [SECONDS] [TARGET=SECONDS...]: 0 seconds runs only the targets named" >&2
  exit 2
fi
all_targets=$(cargo fuzz list)
declare -A time_of=()
order=()
if [[ $seconds -gt 0 ]]; then
  for t in $all_targets; do
    time_of[$t]=$seconds
    order+=("$t")
  done
fi
for arg in "$@"; do
  name=${arg%%=*}
  secs=${arg#*=}
  if ! grep -qx -- "$name" <<<"$all_targets" || [[ $arg != *=* || ! $secs =~ ^[0-9]+$ ]]; then
    echo "usage: $0 [SECONDS] [TARGET=SECONDS...]; targets: $(echo $all_targets)" >&2
    exit 2
  fi
  [[ -v time_of[$name] ]] || order+=("$name")
  time_of[$name]=$secs
done

cargo fuzz build -s "$sanitizer" >&2 || exit 2

found=0
rows=()
for t in "${order[@]}"; do
  secs=${time_of[$t]}
  corpus=fuzz/corpus/$t
  artifacts=fuzz/artifacts/$t
  log=fuzz/artifacts/$t.log
  mkdir -p "$corpus" "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  echo "== $t: ${secs} s" >&2
  dict=()
  [[ -f fuzz/dicts/$t.dict ]] && dict=(-dict="fuzz/dicts/$t.dict")
  status=0
  cargo fuzz run -s "$sanitizer" "$t" "$corpus" "fuzz/seeds/$t" -- \
    -max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
    >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  size=$(find "$corpus" -type f | wc -l)
  new=$(($(find "$artifacts" -type f | wc -l) - before))
  if [[ $new -gt 0 ]]; then
    found=1
    verdict="FOUND ($new new in $artifacts)"
    grep -m 20 -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" >&2 || tail -20 "$log" >&2
  elif [[ $status -ne 0 ]]; then
    found=1
    verdict="FAILED (exit $status, see $log)"
    tail -20 "$log" >&2
  else
    verdict="nothing"
  fi
  echo "   ${execs:-?} executions (${rate:-?}/s), corpus $size, $verdict" >&2
  rows+=("| $t | $secs | ${execs:-?} | $size | $verdict |")
done

echo "| target | seconds | executions | corpus | findings |"
echo "|---|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
exit $found
