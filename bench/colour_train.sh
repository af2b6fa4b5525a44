#!/usr/bin/env bash
# Colour training benchmark, through the CLI as a user runs it (bench/README.md, "Colour"):
# ingest CBSD432, hold 5% out for validation, train a preset, evaluate the published model
# on CBSD68 and Kodak24 at sigma 15/25/50 (one table), and CBSD68 sigma 25 again with the
# gray model of the same budget when its registry is given (the per-channel path).
#
#     SEED=0 MINUTES=30 bench/colour_train.sh cpu-color [ROOT]
#     SEED=0 MINUTES=30 bench/colour_train.sh cpu [ROOT]     # gray, on CBSD432's luma: the per-channel baseline
#     SEED=0 TAG=sigma15 bench/colour_train.sh cpu-color ROOT --noise-sigma 15   # a preset with overrides
#     SUITE=gray SEED=0 bench/colour_train.sh cpu-blind ROOT   # the gray protocol: Train400; Set12, BSD68
#     TAG=fp32 EVALUATE_ARGS=--fp32 bench/colour_train.sh cpu-color ROOT --fp32   # a CPU without bf16
#
# Arguments after ROOT go to `resflow train`, EVALUATE_ARGS to `resflow evaluate`. Writes
# ROOT/<preset>[-<TAG>]-seed<SEED>/{train,evaluate}.json and a log; report sets are never used
# to select.
set -euo pipefail
PRESET=${1:-cpu-color}
ROOT=${2:-.bench/colour}
SEED=${SEED:-0}
MINUTES=${MINUTES:-30}
DATA=${RESFLOW_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
RESFLOW=${RESFLOW:-resflow}
TAG=${TAG:-}
read -r -a EVALUATE_ARGS <<< "${EVALUATE_ARGS:-}"
case ${SUITE:-colour} in
    colour) TRAIN_SET=CBSD432 REPORT_SETS="CBSD68 Kodak24" ;;
    gray) TRAIN_SET=Train400 REPORT_SETS="Set12 BSD68" ;;
    *) echo "SUITE is colour or gray, not $SUITE" >&2; exit 2 ;;
esac
RUN="$ROOT/$PRESET${TAG:+-$TAG}-seed$SEED"
mkdir -p "$RUN"
ingest_once() {  # several runs share the ingested datasets
    [ -e "$2/.done" ] || { rm -rf "$2"; $RESFLOW ingest "$1" "$2" --quiet >/dev/null && touch "$2/.done"; }
}
TRAIN_DATA="$ROOT/data/${TRAIN_SET,,}"
ingest_once "$DATA/$TRAIN_SET" "$TRAIN_DATA"
[ -e "$ROOT/data/val/.done" ] || { rm -rf "$ROOT/data/train" "$ROOT/data/val"
    $RESFLOW split "$TRAIN_DATA" "$ROOT/data/train" "$ROOT/data/val" --val-fraction 0.05 --json > "$ROOT/data/split.json"
    touch "$ROOT/data/val/.done"; }
REPORT_DATA=()
for name in $REPORT_SETS; do ingest_once "$DATA/$name" "$ROOT/data/${name,,}"; REPORT_DATA+=("$ROOT/data/${name,,}"); done
echo "$(date -u +%FT%TZ) train $PRESET ${*:3} seed $SEED for $MINUTES min; load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN/log"
$RESFLOW train --data "$ROOT/data/train" --val-data "$ROOT/data/val" --registry "$RUN/models" --preset "$PRESET" \
    --seed "$SEED" --max-minutes "$MINUTES" "${@:3}" --json > "$RUN/train.json" 2>> "$RUN/log"
echo "$(date -u +%FT%TZ) evaluate; load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN/log"
MODEL=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$RUN/train.json")
$RESFLOW evaluate --model "$MODEL" --data "${REPORT_DATA[@]}" --noise-sigma 15 25 50 \
    ${EVALUATE_ARGS[@]+"${EVALUATE_ARGS[@]}"} --json > "$RUN/evaluate.json" 2>> "$RUN/log"
python -c 'import json, sys; from pipeline.evaluate import format_sigma_table
print(format_sigma_table(json.load(open(sys.argv[1]))["by_sigma"]))' "$RUN/evaluate.json" >> "$RUN/log"
echo "$(date -u +%FT%TZ) done" >> "$RUN/log"
