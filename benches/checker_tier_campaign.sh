#!/usr/bin/env bash
# A campaign of the tier checker (tests/it/checker/tier.rs): batches of ten
# short runs, Postgres proxy mode and guard mode alternating, ONE loop at a
# time (each run starts three replicas, an elector and eight writers on the
# shared Postgres; parallel loops exhausted max_connections before).
#
#   bash benches/checker_tier_campaign.sh [--proxy-seed N] [--guard-seed N]
#                                         [--until HH:MM] [--secs S]
#                                         [--log FILE] [--skip-build]
#                                         [--release] [--nice N]
#
# Builds the test binary, then runs a pinned copy of it and of fencepost
# (FENCEPOST_BIN), so rebuilding the worktree meanwhile changes nothing
# under the campaign. Runs `nice -n 19` (--nice N: another niceness; give
# 0 when the machine has nothing else to do, since a starved replica misses
# its renewals and tests the lapse path instead of the tier). Stops at the first batch with a
# violation (its seed is in the log, with the command that replays each
# run), at --until (UTC, checked between batches), or when the file
# FILE.stop exists. Then prints the totals (benches/checker_tier_totals.py).
# --release builds and runs the release profile (the replicas as a user
# runs them; the printed replay commands build debug unless given
# --release too).
#
# Defaults: proxy seeds from 5000000, guard seeds from 6000000, 5 s runs,
# log target/checker_tier_campaign.log (half a MB per hundred runs: kept out
# of the repository; the seeds replay every run).
set -uo pipefail
cd "$(dirname "$0")/.."

PSEED=5000000
GSEED=6000000
UNTIL=""
SECS=5
LOG=target/checker_tier_campaign.log
BUILD=1
PROFILE=debug
NICE=19

while [ $# -gt 0 ]; do
    case "$1" in
        --proxy-seed) PSEED="$2"; shift 2 ;;
        --guard-seed) GSEED="$2"; shift 2 ;;
        --until) UNTIL="$2"; shift 2 ;;
        --secs) SECS="$2"; shift 2 ;;
        --log) LOG="$2"; shift 2 ;;
        --skip-build) BUILD=0; shift ;;
        --release) PROFILE=release; shift ;;
        --nice) NICE="$2"; shift 2 ;;
        -h|--help) sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done

export DATABASE_URL="${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
PROFILE_FLAG=()
[ "$PROFILE" = release ] && PROFILE_FLAG=(--release)
if [ "$BUILD" = 1 ]; then
    cargo build "${PROFILE_FLAG[@]}" -p fencepost --test it --bin fencepost >&2 || exit 1
fi
# The newest `it` test executable (not its .d file) and the binary.
IT=$(ls -t target/$PROFILE/deps/it-* 2>/dev/null | grep -v '\.d$' | head -n 1)
[ -n "$IT" ] && [ -x target/$PROFILE/fencepost ] || {
    echo "no test binary: run without --skip-build" >&2
    exit 1
}
PIN=$(mktemp -d "${TMPDIR:-/tmp}/fp-campaign.XXXXXX")
trap 'rm -rf "$PIN"' EXIT
cp "$IT" "$PIN/it"
cp target/$PROFILE/fencepost "$PIN/fencepost"
export FENCEPOST_BIN="$PIN/fencepost"
export FENCEPOST_CHECKER_RUNS=10 FENCEPOST_CHECKER_SECS="$SECS"
echo "=== campaign on $(git rev-parse --short HEAD) ($PROFILE, nice $NICE) from $(date -u +%H:%M:%S)" >>"$LOG"

past_until() {
    [ -n "$UNTIL" ] && [[ ! "$(date -u +%H:%M)" < "$UNTIL" ]]
}

status=0
while [ ! -e "$LOG.stop" ] && ! past_until; do
    for mode in proxy guard; do
        if [ "$mode" = proxy ]; then
            seed=$PSEED; PSEED=$((PSEED + 10))
            test=checker::tier::fencing_holds_across_a_tier_of_three_replicas
        else
            seed=$GSEED; GSEED=$((GSEED + 10))
            test=checker::tier::fencing_holds_across_a_tier_in_guard_mode
        fi
        echo "=== batch $mode seed $seed start $(date -u +%H:%M:%S)" >>"$LOG"
        FENCEPOST_CHECKER_SEED=$seed nice -n "$NICE" "$PIN/it" --exact "$test" --nocapture >>"$LOG" 2>&1
        rc=$?
        echo "=== batch $mode seed $seed end $(date -u +%H:%M:%S) rc $rc" >>"$LOG"
        if [ $rc -ne 0 ] && sed -n "/=== batch $mode seed $seed start/,\$p" "$LOG" | grep -q "VIOLATION"; then
            echo "=== STOP: violation in batch $mode seed $seed" | tee -a "$LOG" >&2
            status=1
            break 2
        fi
    done
done
python3 benches/checker_tier_totals.py "$LOG"
exit $status
