#!/usr/bin/env bash
# bench/gpu.sh — the GPU check, one script for one lease of the device tool (H100/H200).
#
# Prepare here (CPU):  python bench/prepare_gpu.py   -> .gpu/ (git-ignored, ~55 MB):
#   .gpu/flickr8k.tar.gz  Flickr8k train+val images re-encoded (JPEG q40, still 224 px) + captions
#   .gpu/lite0.pth     EfficientNet-Lite0 ImageNet weights in timm key names (float16)
#   .gpu/whl/*.whl     hydra-core, omegaconf, antlr4 (not in the device image)
#   .gpu/py/           pycocoevalcap's pure-Python scorers (the 100 MB Java jars stay here)
# Run there:  bash bench/gpu.sh   (device tool: carry [".gpu"]), results in $OUT/gpu_results.tgz.
# Scoring there uses metrics.java=false; every caption file comes back and is re-scored here
# with the Java COCO toolkit:  python bench/rescore.py <unpacked results dir>
#
# Stages (each timed; a failure is logged and the next stage still runs; a stage that would
# pass DEADLINE is cut short or skipped):
#   speed      bench/speed.py on cuda: bare decoder-step ceiling vs the Lightning loop (bf16)
#   e2e        Flickr8k end to end: extraction + 20 epochs Show and Tell + beam-3 val captions
#   sweep      2x2 Show-and-Tell sweep (crop, label smoothing; dropout 0.5), 8 epochs each
#   sat        Show, Attend and Tell (cross-entropy), beam-3 val captions
#   *_scst     SCST second stages from the Show-and-Tell and SAT checkpoints, beam-3 captions
set -u
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/imcap-gpu-out}
SMOKE=${SMOKE:-0}
W=/tmp/imcap-gpu
rm -rf "$W" && mkdir -p "$W" "$OUT"
T0=$(date +%s%N)
secs() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'; }

PY=${PY:-python3}
if [ -d .gpu/whl ] && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src:$PWD/.gpu/py"
export IMCAP_ROOT=$PWD IMCAP_CACHE_DIR=/tmp/imcap-cache
mkdir -p /tmp/imcap-data && tar -xzf .gpu/flickr8k.tar.gz -C /tmp/imcap-data
DATA=/tmp/imcap-data/flickr8k
nvidia-smi > "$W/nvidia-smi.txt" 2>&1
$PY -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', timm.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee "$W/versions.txt"

DEADLINE=${DEADLINE:-500}  # seconds for the whole script (the device tool allows 600 per call)
stage() {  # stage NAME TIMEOUT_S command... : skipped, or cut short, to end before DEADLINE
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s%N) - T0) / 1000000000 - 15 ))
  if [ "$left" -lt 30 ]; then echo "$name        skipped (out of time)" | tee -a "$W/stages.txt"; return 1; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local s=$(date +%s%N)
  timeout "$limit" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  printf "%-12s rc=%-3s %9s s\n" "$name" "$rc" "$(secs "$s")" | tee -a "$W/stages.txt"
  return $rc
}

if [ "$SMOKE" = 1 ]; then
  SIZE="data.max_train_images=64 data.max_eval_images=32"
  E2E_EPOCHS=1 SAT_EPOCHS=1 SCST_EPOCHS=1 SWEEP_EPOCHS=1 V5=1 V3=1 V2=1
  SPEED="--smoke --device cpu"
  ACC="trainer=cpu"
else
  SIZE=""
  V5=5 V3=3 V2=2
  SPEED="--device cuda --precision bf16-mixed --batch-size 128 --steps 300 --warmup 30 --extract-images 2000 --extract-batch 250 --workers 12 --decode-batch 500"
  ACC="trainer=gpu"
fi
COMMON="data.root=$DATA encoder.pretrained=$PWD/.gpu/lite0.pth metrics.java=false data.num_workers=12 data.eval_batch_size=500 model.decoding.beam_size=3 test=false logger=csv +trainer.enable_progress_bar=false $SIZE"
# model.decoding.beam_size=3: validation (and the final val of the best checkpoint, whose captions
# land in captions_val.json) decodes with beam 3.

# Flickr8k end to end in one process: cold feature cache, 20 epochs, val (beam 3) every 5.
rm -rf /tmp/imcap-cache
stage e2e 150 $PY src/train.py experiment=show_tell_flickr8k $ACC $COMMON trainer.max_epochs=${E2E_EPOCHS:-20} \
  trainer.check_val_every_n_epoch=$V5 hydra.run.dir="$W/e2e" \
  || { stage e2e_fp32 120 $PY src/train.py experiment=show_tell_flickr8k $ACC trainer.precision=32-true $COMMON \
       trainer.max_epochs=${E2E_EPOCHS:-20} trainer.check_val_every_n_epoch=$V5 hydra.run.dir="$W/e2e" \
       && ACC="$ACC trainer.precision=32-true"; }  # bf16 failed: the later stages use fp32 too

# Show, Attend and Tell, cross-entropy.
stage sat 150 $PY src/train.py experiment=sat_flickr8k $ACC $COMMON trainer.max_epochs=${SAT_EPOCHS:-12} \
  trainer.check_val_every_n_epoch=$V3 hydra.run.dir="$W/sat"

# SCST second stages (CIDEr-D reward in-process, greedy baseline) from both CE checkpoints.
for base in e2e sat; do
  ckpt=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['best_checkpoint'])" "$W/$base/metrics.json" 2>/dev/null) || continue
  exp=$([ $base = sat ] && echo sat_scst_flickr8k || echo show_tell_scst_flickr8k)
  stage ${base}_scst 120 $PY src/train.py experiment=$exp $ACC $COMMON init_from="$ckpt" \
    trainer.max_epochs=${SCST_EPOCHS:-6} trainer.check_val_every_n_epoch=$V2 hydra.run.dir="$W/${base}_scst"
done

stage speed 150 $PY bench/speed.py $SPEED --out "$W/speed" \
  || stage speed_fp32 120 $PY bench/speed.py ${SPEED/bf16-mixed/32-true} --out "$W/speed"

# A small sweep on the cached features (basic sweeper, one GPU per trial, in sequence): crop
# and regularisation of the Show-and-Tell recipe, 10 epochs each; summary.md in the sweep dir.
stage sweep 150 $PY src/train.py -m experiment=show_tell_flickr8k $ACC $COMMON trainer.max_epochs=${SWEEP_EPOCHS:-8} \
  trainer.check_val_every_n_epoch=$V2 "encoder.crop_pct=1.0,0.875" decoder.dropout=0.5 \
  "model.loss.label_smoothing=0.0,0.1" hydra.sweep.dir="$W/sweep"

printf "%-12s        %9s s\n" total "$(secs "$T0")" | tee -a "$W/stages.txt"
# Bring back everything small: logs, metrics, captions, curves, attention maps (no checkpoints).
find "$W" -name "*.ckpt" -delete
find "$W" -type d -path "*/attention/epoch_*" -prune -exec rm -rf {} +  # keep attention/best
tar -czf "$OUT/gpu_results.tgz" -C "$W" . && ls -la "$OUT"
cat "$W/stages.txt"
