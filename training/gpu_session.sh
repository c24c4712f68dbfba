#!/usr/bin/env bash
# One prepared GPU session of the training recipe (the `device` tool's `run`, or any CUDA machine):
# continue pre-training the committed language model (training_state/lm.pt) on CUDA in bf16 with
# 4x wider batches, then fine-tune, from a pack (python -m training.pack), inside a wall-clock budget.
#
#   OUT=/some/dir BUDGET_S=540 LM_SHARE=0.6 bash training/gpu_session.sh
#
# Results: $OUT/run/ (the new run's committed state: lm.pt, finetune.pt, run.json, ...) and
# $OUT/session.log. Copy $OUT/run to training_state/<name> and continue there (export + test):
#   python -m training.train --state-dir training_state/<name> [same flags without --pack/--device]
set -euo pipefail
OUT=${OUT:-runs/gpu}
BUDGET_S=${BUDGET_S:-540}     # the whole script, wall clock
LM_SHARE=${LM_SHARE:-0.6}     # of what is left after the speed probe, for language-model epochs
PACK=${PACK:-.pack/corpus.xz}
DEVICE=${DEVICE:-cuda}        # cpu only to rehearse the script
PROBE_STEPS=${PROBE_STEPS:-120}
export PYTHONUNBUFFERED=1
START=$(date +%s)
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

# bf16 autocast where this torch/cuDNN runs an LSTM backward in it, else fp32.
PRECISION=$(python3 - "$DEVICE" <<'PY'
import sys, torch
try:
    lstm = torch.nn.LSTM(8, 8, batch_first=True).to(sys.argv[1])
    with torch.autocast(sys.argv[1], dtype=torch.bfloat16):
        out, _ = lstm(torch.randn(2, 3, 8, device=sys.argv[1]))
    out.float().sum().backward()
    print("bf16")
except Exception as exc:
    print(f"bf16 LSTM failed ({exc!r}); using fp32", file=sys.stderr)
    print("fp32")
PY
)
RUN=(python3 -m training.train --pack "$PACK" --init-from training_state --state-dir "$OUT/run"
     --checkpoint-dir /tmp/gpu-ckpt --out /tmp/gpu-art --device "$DEVICE" --precision "$PRECISION"
     --embedding-dim 200 --hidden-size 384 --layers 1 --dropout 0.4 --vocab-size 25000 --min-freq 3
     --lm-rows 256 --lm-lr 2e-3 --lm-warmup-steps 200 --checkpoint-every-minutes 2)

# 1. Speed probe: the real run's first steps (its schedule is still warming up).
"${RUN[@]}" --lm-epochs 12 --stop-after-steps "$PROBE_STEPS"
read -r EPOCHS LEFT < <(python3 - "$OUT/run" "$START" "$BUDGET_S" "$LM_SHARE" <<'PY'
import json, sys, time, torch
run, start, budget, share = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
pos = torch.load(f"{run}/lm.pt", map_location="cpu", weights_only=False)["position"]
info = json.load(open(f"{run}/run.json"))["phases"]["lm"]
tok_s = pos["tokens"] / pos["seconds"]
left = budget - (time.time() - start)
epoch_s = info["tokens_per_epoch"] / tok_s + 6  # + held-out perplexity and probe per epoch
epochs = max(1, min(24, int(share * left / epoch_s)))
print(f"probe: {tok_s:,.0f} tokens/s, {epoch_s:.0f} s per epoch, {left:.0f} s left -> {epochs} epochs", file=sys.stderr)
print(epochs, int(left))
PY
)
# 2. The language model for the chosen epochs, then fine-tuning, until the budget (less 20 s) is spent.
"${RUN[@]}" --lm-epochs "$EPOCHS" --stop-after-minutes "$(python3 -c "print(max(0.5, ($LEFT - 20) / 60))")"
echo "session done in $(( $(date +%s) - START )) s"
ls -la "$OUT/run"
