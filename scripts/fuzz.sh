#!/usr/bin/env bash
# Coverage-guided fuzzing of every target (cargo-fuzz, libFuzzer), one after another.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]  # each target for SECONDS (default 60)
#   bash scripts/fuzz.sh seed                   # write the seeds into fuzz/corpus/
#   bash scripts/fuzz.sh cmin [TARGET...]       # minimise the corpora in place
#
# Targets: wire seal link nbd journal_plan journal_open config (docs/testing.md,
# Fuzzing). New corpus inputs go to fuzz/corpus/TARGET/, crashes to
# fuzz/artifacts/TARGET/. Prints one line per target: executions, libFuzzer's final
# cov/ft figures, corpus size, findings; full logs in LOG_DIR (default
# $FUZZ_TARGET_DIR/logs). Exit status 1 if any target found something.
#
# RUNS=N stops a target after N executions if that comes before SECONDS. One process per
# target (libFuzzer's default, as -jobs=1; the machine's other cores stay free).
# FUZZ_TARGET_DIR (default $CARGO_TARGET_DIR/fuzz, else target/fuzz) holds the build;
# SANITIZER is cargo fuzz's --sanitizer: none by default (about 5 times the executions
# of address here; ASan would instrument only the Rust code, whose memory safety the
# compiler checks outside unsafe blocks), SANITIZER=address to run under ASan. Needs the
# nightly toolchain and cargo-fuzz (cargo install cargo-fuzz).
set -euo pipefail
cd "$(dirname "$0")/.."
ALL=(wire seal link nbd journal_plan journal_open config)
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/fuzz}
SANITIZER=${SANITIZER:-none}
LOG_DIR=${LOG_DIR:-$FUZZ_TARGET_DIR/logs}

targets() {
    if [ $# -gt 0 ]; then echo "$@"; else echo "${ALL[@]}"; fi
}

fuzz() {
    cargo +nightly fuzz "$@"
}

# Per-target libFuzzer options: the journal targets take whole directories of segments.
options() {
    case "$1" in
        journal_plan | journal_open) echo "-max_len=65536" ;;
        *) echo "" ;;
    esac
}

case "${1:-}" in
    seed)
        cargo test -q -p tidemark --test fuzz_corpus -- --ignored write_seeds
        cargo test -q -p tidemark-cli --test fuzz_corpus -- --ignored write_seeds
        exit 0
        ;;
    cmin)
        shift
        for t in $(targets "$@"); do
            fuzz cmin --sanitizer "$SANITIZER" --target-dir "$FUZZ_TARGET_DIR" "$t" \
                "fuzz/corpus/$t" -- $(options "$t")
        done
        exit 0
        ;;
esac

SECONDS_EACH=${1:-60}
[ $# -gt 0 ] && shift
mkdir -p "$LOG_DIR"
fuzz build --sanitizer "$SANITIZER" --target-dir "$FUZZ_TARGET_DIR"
BIN=$FUZZ_TARGET_DIR/$(rustc +nightly -vV | sed -n 's/^host: //p')/release
status=0
printf '%-14s %12s %8s %8s %8s %s\n' target executions cov ft corpus findings
for t in $(targets "$@"); do
    log="$LOG_DIR/$t.log"
    runs=()
    [ -n "${RUNS:-}" ] && runs=("-runs=$RUNS")
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    before=$(ls "fuzz/artifacts/$t" | wc -l)
    # The binary built above, run directly (not by `cargo fuzz run`, which would rebuild
    # it from sources edited meanwhile).
    set +e
    "$BIN/$t" -artifact_prefix="fuzz/artifacts/$t/" -max_total_time="$SECONDS_EACH" \
        -timeout=10 -print_final_stats=1 "${runs[@]}" $(options "$t") "fuzz/corpus/$t" \
        >"$log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | grep -E 'cov: ' | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corpus=$(ls "fuzz/corpus/$t" | wc -l)
    found=$(($(ls "fuzz/artifacts/$t" | wc -l) - before))
    note="$found"
    if [ "$rc" -ne 0 ] || [ "$found" -gt 0 ]; then
        note="$found (exit $rc; see $log and fuzz/artifacts/$t)"
        status=1
    fi
    printf '%-14s %12s %8s %8s %8s %s\n' "$t" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$corpus" "$note"
done
exit $status
