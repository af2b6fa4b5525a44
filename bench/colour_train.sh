#!/usr/bin/env bash
# Colour training benchmark, through the CLI as a user runs it (bench/README.md, "Colour"):
# ingest CBSD432, hold 5% out for validation, train a preset, evaluate the published model
# on CBSD68 and Kodak24 at sigma 15/25/50 (one table), and CBSD68 sigma 25 again with the
# gray model of the same budget when its registry is given (the per-channel path).
#
#     SEED=0 MINUTES=30 bench/colour_train.sh cpu-color [ROOT]
#     SEED=0 MINUTES=30 bench/colour_train.sh cpu [ROOT]     # gray, on CBSD432's luma: the per-channel baseline
#     SEED=0 TAG=sigma15 bench/colour_train.sh cpu-color ROOT --noise-sigma 15   # a preset with overrides
#
# Arguments after ROOT go to `resflow train`. Writes ROOT/<preset>[-<TAG>]-seed<SEED>/{train,evaluate}.json
# and a log; report sets are never used to select.
set -euo pipefail
PRESET=${1:-cpu-color}
ROOT=${2:-.bench/colour}
SEED=${SEED:-0}
MINUTES=${MINUTES:-30}
DATA=${RESFLOW_SHARED_DATA:-$(cd "$(dirname "$0")/../.." && pwd)/shared/data}
RESFLOW=${RESFLOW:-resflow}
TAG=${TAG:-}
RUN="$ROOT/$PRESET${TAG:+-$TAG}-seed$SEED"
mkdir -p "$RUN"
ingest_once() {  # several runs share the ingested datasets
    [ -e "$2/.done" ] || { rm -rf "$2"; $RESFLOW ingest "$1" "$2" --quiet >/dev/null && touch "$2/.done"; }
}
ingest_once "$DATA/CBSD432" "$ROOT/data/cbsd432"
[ -e "$ROOT/data/val/.done" ] || { rm -rf "$ROOT/data/train" "$ROOT/data/val"
    $RESFLOW split "$ROOT/data/cbsd432" "$ROOT/data/train" "$ROOT/data/val" --val-fraction 0.05 --json > "$ROOT/data/split.json"
    touch "$ROOT/data/val/.done"; }
ingest_once "$DATA/CBSD68" "$ROOT/data/cbsd68"
ingest_once "$DATA/Kodak24" "$ROOT/data/kodak24"
echo "$(date -u +%FT%TZ) train $PRESET ${*:3} seed $SEED for $MINUTES min; load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN/log"
$RESFLOW train --data "$ROOT/data/train" --val-data "$ROOT/data/val" --registry "$RUN/models" --preset "$PRESET" \
    --seed "$SEED" --max-minutes "$MINUTES" "${@:3}" --json > "$RUN/train.json" 2>> "$RUN/log"
echo "$(date -u +%FT%TZ) evaluate; load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$RUN/log"
MODEL=$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$RUN/train.json")
$RESFLOW evaluate --model "$MODEL" --data "$ROOT/data/cbsd68" "$ROOT/data/kodak24" --noise-sigma 15 25 50 \
    --json > "$RUN/evaluate.json" 2>> "$RUN/log"
python -c 'import json, sys; from pipeline.evaluate import format_sigma_table
print(format_sigma_table(json.load(open(sys.argv[1]))["by_sigma"]))' "$RUN/evaluate.json" >> "$RUN/log"
echo "$(date -u +%FT%TZ) done" >> "$RUN/log"
