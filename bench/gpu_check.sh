#!/usr/bin/env bash
# The GPU path end to end on one lent NVIDIA GPU, in one command of at most --budget seconds (default 540 = 9 min).
#
#   bench/gpu_check.sh [--out DIR] [--budget SECONDS] [--stages a,b,...] [--cpu-smoke]
#
# Stages, in order, each with its own time limit (cut to what is left of the budget; a stage that would not fit is
# recorded as skipped), its log in DIR/<stage>.log, and its status in DIR/summary.md. A failing stage is recorded and
# the next one runs; the exit status is 1 if any stage failed.
#   versions    nvidia-smi, torch/CUDA/cuDNN, the card(s)
#   gpu_step    bench/gpu_step.py: the trainer's bf16 step and its MFU, ResNet-50 and ViT-B/16, batch 72, 224²
#   augment     DeviceAugment (data.augment_on_device) on a batch of 72 at 224² on the GPU beside one CPU thread
#   pretrain    a short bf16 mlip-pretrain run on SynthCXR at 224² (ResNet-50, augmentation on the GPU), then the
#               same run resumed for more steps from its checkpoint; every logged loss must be finite
#   dp_step     one bucketed-DP trainer step at paper size against a plain one: time, peak GPU memory
#   federation  mlip-simulate: 2 sites, 2 rounds sharing the one GPU (--gpus-per-site 0.5), finite losses
#   compile     bench/gpu_step.py --compile with whatever time is left
# Nothing is installed or downloaded: the environment must already hold the project (the CUDA lock file's
# packages); Hugging Face, pip and Flower are told to stay offline.
#
# --cpu-smoke runs the Python stages at tiny sizes on the CPU (the federation stage only checks its command line,
# compile is skipped): the code path a GPU run takes, short enough for tests/test_gpu_check.py.
set -u -o pipefail

cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi
OUT=runs/gpu_check
BUDGET=540
STAGES=versions,gpu_step,augment,pretrain,dp_step,federation,compile
SMOKE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

export PY OUT SMOKE # read by the stage functions, which run in a child bash under `timeout`
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$(date +%s)
FAILED=0
{
  echo "# GPU check"
  echo
  echo "Command: \`bench/gpu_check.sh $*\` (mode: $([[ $SMOKE == 1 ]] && echo 'CPU smoke, tiny sizes' || echo GPU)), budget ${BUDGET} s, started $(date -u '+%Y-%m-%d %H:%M UTC'), python \`$PY\`."
  echo
  echo "| stage | status | seconds | limit s |"
  echo "|---|---|---:|---:|"
} >"$SUMMARY"
DETAILS="$OUT/.details.md"
: >"$DETAILS"

wanted() { [[ ",$STAGES," == *",$1,"* ]]; }

# run_stage NAME LIMIT_SECONDS KEEP_LINES COMMAND...: run under `timeout`, log to OUT/NAME.log, record the outcome.
run_stage() {
  local name="$1" limit="$2" keep="$3"
  shift 3
  wanted "$name" || return 0
  local left=$((BUDGET - ($(date +%s) - START) - 5))
  if ((left < 15)); then
    echo "| $name | skipped: ${left} s of the budget left | 0 | - |" >>"$SUMMARY"
    return 0
  fi
  ((limit > left)) && limit=$left
  local t0 rc status
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then # a stage function: `timeout` runs programs, so hand it to a child bash
    timeout --kill-after=10 "$limit" bash -c "set -o pipefail; $(declare -f "$1"); $1" >"$OUT/$name.log" 2>&1
  else
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  fi
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="**timeout** (limit ${limit} s)"; FAILED=1 ;;
    *) status="**failed** (exit $rc)"; FAILED=1 ;;
  esac
  echo "| $name | $status | $(($(date +%s) - t0)) | $limit |" >>"$SUMMARY"
  {
    echo "## $name"
    echo
    echo '```text'
    tail -n "$keep" "$OUT/$name.log"
    echo '```'
    echo
  } >>"$DETAILS"
}

stage_versions() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv
    nvidia-smi -L
  else
    echo "nvidia-smi: not found"
  fi
  "$PY" bench/gpu_check_stages.py versions
}

stage_pretrain() {
  local common=(--no-eval "output_dir=$OUT/pretrain" "data.root=$OUT/data" train.progress_bar=false train.log_every=1
    data.augment_on_device=true)
  if [[ $SMOKE == 1 ]]; then
    common+=(experiment=smoke train.epochs=3 train.device=cpu train.amp=bf16 train.num_threads=1 data.image_size=32)
  else
    common+=(model=resnet50 train=gpu data.image_size=224 data.synthetic.num_sites=1 data.synthetic.studies_per_site=80
      train.batch_size=16)
  fi
  rm -rf "$OUT/pretrain"
  "$PY" -m mlip_fed.cli.pretrain "${common[@]}" train.max_steps=3 || return 1
  echo "--- resumed run ---"
  "$PY" -m mlip_fed.cli.pretrain "${common[@]}" train.max_steps=6 | tee "$OUT/pretrain_resumed.out" || return 1
  grep -q "resumed from" "$OUT/pretrain_resumed.out" || { echo "the second run did not resume"; return 1; }
  "$PY" bench/gpu_check_stages.py finite-losses "$OUT/pretrain/metrics.jsonl" --min-records 6
}

stage_federation() {
  if [[ $SMOKE == 1 ]]; then
    "$PY" -m mlip_fed.cli.simulate --help | grep -q -- "--gpus-per-site" && echo "mlip-simulate --gpus-per-site: present"
    return
  fi
  rm -rf "$OUT/federation"
  "$PY" -m mlip_fed.cli.simulate --sites 2 --rounds 2 --gpus-per-site 0.5 --cpus-per-site 4 --timeout 200 \
    --out "$OUT/federation" experiment=smoke model=resnet50 train=gpu data.image_size=224 data.num_workers=2 \
    "data.root=$OUT/data_fed" train.progress_bar=false || return 1
  "$PY" bench/gpu_check_stages.py federation "$OUT/federation/results.json" --rounds 2
}

if [[ $SMOKE == 1 ]]; then
  STEP_ARGS=(--device cpu --tiny --archs resnet50 --steps 1 --repeats 1 --warmup 0 --threads 1)
  DP_ARGS=(--device cpu --tiny --steps 1)
  AUG_ARGS=(--device cpu --tiny --repeats 2)
else
  STEP_ARGS=(--archs resnet50 vit_b16 --batch-size 72 --steps 10 --repeats 2 --warmup 3)
  DP_ARGS=(--arch resnet50 --steps 2)
  AUG_ARGS=(--repeats 10)
fi

run_stage versions 30 40 stage_versions
run_stage gpu_step 170 12 "$PY" bench/gpu_step.py "${STEP_ARGS[@]}"
run_stage augment 30 4 "$PY" bench/gpu_check_stages.py augment "${AUG_ARGS[@]}"
run_stage pretrain 120 12 stage_pretrain
run_stage dp_step 90 4 "$PY" bench/gpu_check_stages.py dp-step "${DP_ARGS[@]}"
run_stage federation 160 8 stage_federation
if [[ $SMOKE == 1 ]]; then
  wanted compile && echo "| compile | skipped: CPU smoke (torch.compile is timed on a GPU only) | 0 | - |" >>"$SUMMARY"
else
  run_stage compile 600 12 "$PY" bench/gpu_step.py "${STEP_ARGS[@]}" --compile
fi

{
  echo
  echo "Total $(($(date +%s) - START)) s of a ${BUDGET} s budget. Logs: \`$OUT/<stage>.log\`."
  echo
  cat "$DETAILS"
} >>"$SUMMARY"
rm -f "$DETAILS"
echo "summary: $SUMMARY"
cat "$SUMMARY"
exit $FAILED
