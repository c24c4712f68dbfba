#!/usr/bin/env bash
# Fine-tuning ablations in one GPU session: each variant fine-tunes the shipped run's language model
# (training_state/r2/lm.pt) with ONE ingredient of the recipe changed, all variants in parallel on one
# GPU, from a pack (python -m training.pack --state-dir training_state/r2 --out .pack/corpus.xz).
#
#   OUT=/some/dir BUDGET_S=420 [SET=vat] bash training/gpu_ablations.sh
#
# Writes $OUT/session.log and $OUT/ablations.tar.gz (<variant>/run.json, validation_predictions.json,
# train.log: few files, for a device tool that brings back at most 8). Unpack it and compare each
# variant with the shipped run, paired on the same validation reviews:
#   tar -xzf ablations.tar.gz -C runs/ablations
#   python -m training.compare training_state/r2/validation_predictions.json runs/ablations/<variant>/validation_predictions.json
set -euo pipefail
OUT=${OUT:-runs/ablations}
BUDGET_S=${BUDGET_S:-420}
PACK=${PACK:-.pack/corpus.xz}
DEVICE=${DEVICE:-cuda}          # cpu only to rehearse the script
EXTRA=${EXTRA:-}                # e.g. "--stop-after-steps 3 --epochs 1" to rehearse
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# One change each from run 2's recipe (read from its run.json; a flag given here overrides it, even
# at its default value). "No adversarial training" was measured on CPU already (no difference); raw
# against averaged weights is in every run's history.
# SET=vat: the Miyato et al. ingredients (issue 28) instead, against run 2 (adversarial, raw embeddings)
# and the CPU ablation without adversarial training (training_state/ablations/).
SET=${SET:-recipe}
if [ "$SET" = vat ]; then
  declare -A VARIANTS=(
    [normalised-adversarial]="--normalise-embeddings"
    [vat]="--normalise-embeddings --adv-eps 0 --vat-eps 5"
    [adversarial-and-vat]="--normalise-embeddings --vat-eps 5"
    [vat-longer]="--normalise-embeddings --adv-eps 0 --vat-eps 5 --epochs 12"
  )
else
  declare -A VARIANTS=(
    [no-gradual-unfreezing]="--no-gradual-unfreezing"
    [one-learning-rate]="--lr-group-decay 1"
    [no-per-step-loss]="--aux-weight 0"
    [longer-fine-tuning]="--epochs 12"
  )
fi
pids=()
for name in "${!VARIANTS[@]}"; do
  state=/tmp/ablation/$name
  rm -rf "$state" && mkdir -p "$state"
  cp training_state/r2/lm.pt training_state/r2/vocab.json "$state/"
  python3 - training_state/r2/run.json "$state/run.json" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
run["phases"].pop("finetune", None)  # the language model is done; fine-tuning starts afresh
run["sessions"] = []
json.dump(run, open(sys.argv[2], "w"), indent=2)
PY
  # shellcheck disable=SC2086
  python3 -m training.train --pack "$PACK" --state-dir "$state" --checkpoint-dir "$state-ckpt" \
    --out "$state-art" --device "$DEVICE" --precision bf16 \
    --stop-after-minutes "$(python3 -c "print($BUDGET_S / 60 - 0.5)")" ${VARIANTS[$name]} $EXTRA \
    > "/tmp/ablation/$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}" || true  # (a bare `wait` would also wait for the tee above, forever)
mkdir -p /tmp/ablation-out
for name in "${!VARIANTS[@]}"; do
  mkdir -p "/tmp/ablation-out/$name"
  cp "/tmp/ablation/$name/run.json" "/tmp/ablation/$name.log" "/tmp/ablation-out/$name/"
  cp "/tmp/ablation/$name/validation_predictions.json" "/tmp/ablation-out/$name/" 2>/dev/null \
    || echo "$name: did not finish"
  echo "== $name (${VARIANTS[$name]})"; tail -3 "/tmp/ablation/$name.log"
done
tar -czf "$OUT/ablations.tar.gz" -C /tmp/ablation-out .
