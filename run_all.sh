#!/usr/bin/env bash
# The whole study in one command: stage-1 model -> general text set -> stage-2 fine-tunes that log their
# learning-forgetting trajectory (AdamW vs SAM at equal compute, a rho sweep, seeds, rehearsal, LoRA, data
# sets of increasing distance) -> the Wise-FT curve (probe.py) -> evaluations -> loss landscapes ->
# $OUT/REPORT.md, every number read from the files the steps wrote (measure.py measures, study.py and
# verdict.py decide, report.py renders).
#
#   bash run_all.sh                           # PROFILE=smol: SmolLM2-135M-Instruct, offline, 2-core CPU -> results/
#   PROFILE=tiny bash run_all.sh              # the same steps and report on the 2-layer `tiny` model -> results-tiny/
#   PROFILE=smol-full bash run_all.sh         # smol with more items, a second task, landscapes, more data sets
#   PROFILE=variants bash run_all.sh          # smol plus the SAM variants (looksam, msam, samon, ...) -> results/
#   PROFILE=paper bash run_all.sh             # the paper's models, data, hyperparameters (hub + 16 GPUs)
#   DRY_RUN=1 PROFILE=paper bash run_all.sh   # print every command it would run, run nothing
#   SEEDS=3 OUT=results2 bash run_all.sh --grad-clip 0   # seeds 0 1 2 (or SEEDS="0 7"); args go to finetune.py
#
# Each step is skipped when its output exists, so running it again resumes an interrupted study (and
# re-renders the report). Step logs: $OUT/logs/ (VERBOSE=1 also prints them). Multi-node: torchrun
# reads PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, or set TORCHRUN_ARGS.
# Every variable below can be overridden from the environment.
set -euo pipefail
[[ -z ${OUT:-} || $OUT == /* ]] || OUT=$PWD/$OUT   # a relative OUT is the caller's; the default is in the repo
cd "$(dirname "$0")"

PROFILE=${PROFILE:-smol}
case $PROFILE in
  tiny)
    : "${MODEL:=tiny}" "${TASKS:=mmlu_stem boolq hellaswag arc_challenge truthfulqa_mc1}" "${LIMIT:=4}"
    : "${DTYPE:=fp32}" "${PRECISION:=fp32}" "${TRAIN_LIMIT:=16}" "${HELDOUT:=8}" "${MAX_LEN:=128}"
    : "${BATCH:=8}" "${MICRO:=4}" "${CANDIDATES:=jeopardy:1e-3:2}" "${RHOS:=0.05 2}"
    : "${SEEDS:=0 1}" "${OTHER_DATA:=}" "${DISTANCE_NEAR:=gsm8k}" "${LS_STEPS:=3}" "${LS_BATCHES:=1}"
    : "${LS_BATCH_SIZE:=2}" "${EVAL_EVERY:=1}" "${GENERAL_N:=8}" "${LORA:=4}" "${DP_EVAL:=all}"
    : "${WISEFT_ALPHAS:=0 0.5 1}" "${LRS:=3e-4 3e-3}" "${SAM_LR2:=3e-3}"
    : "${COSTS:=20 15 10 15 8 8}" ;;
  smol|smol-full|variants)
    # bf16 only where the CPU has bf16 matrix units (AMX / AVX512-BF16); emulated bf16 is many times slower
    CPU_BF16=$(grep -qsE 'amx_bf16|avx512_bf16' /proc/cpuinfo && echo bf16 || echo fp32)
    : "${MODEL:=smollm2-135m}" "${DTYPE:=$CPU_BF16}" "${PRECISION:=auto}"
    : "${MAX_LEN:=256}" "${LS_BATCH_SIZE:=8}"
    if [[ $PROFILE != smol-full ]]; then   # smol, and variants: smol plus the SAM variants, in the same OUT
      # The verdict against AdamW's learning-rate frontier (verdict.py), sized for <= 45 minutes on a 2-core
      # CPU (BENCHMARKS.md has the measured time): rot13 (chosen by measurement: docs/findings.md, 2026-12-04),
      # 16 items in steps of 4 (AdamW 8 steps, SAM 4), AdamW at 3 learning rates over 10x (3e-5 1e-4 3e-4: lr
      # 1e-3 is dominated on every seed; 3e-5 measured whether a smaller lr reaches the remedies that learn
      # little - it does not, it is dominated by 1e-4 (docs/findings.md); smol-full runs all four), SAM (rho 0.02, chosen in advance: docs/finetune.md#choosing-rho)
      # at lr 3e-4 and 1e-3, the schedule control, 6 seeds; every run warms up 2 steps and anneals (cosine)
      # to 0; fp32 compute on 2 seeds; multiple choice for the first seed's key models only (a small panel of
      # the tasks SmolLM2-135M is above chance on); no landscapes, distance data or Δp rerun (smol-full).
      : "${TASKS:=hellaswag arc_easy sciq}" "${LIMIT:=40}" "${TRAIN_LIMIT:=16}" "${BATCH:=4}" "${MICRO:=4}"
      : "${HELDOUT:=32}" "${CALIBRATE:=0}" "${STAGE2_DATA:=rot13}" "${STAGE2_LR:=3e-4}"
      : "${LRS:=3e-5 1e-4}" "${SAM_LR2:=1e-3}" "${RHOS:=0.02}" "${SEEDS:=6}"
      : "${FEW_SEEDS:=0}" "${FP32_N:=2}" "${OTHER_DATA:=}" "${DISTANCE_NEAR:=}" "${LANDSCAPES:=0}"
      : "${MATCHED_DP:=0}" "${SAM2_N:=3}" "${SEED_EVALS:=0}" "${LS_STEPS:=5}" "${LS_BATCHES:=1}" "${EVAL_EVERY:=8}" "${GENERAL_N:=32}"
      : "${LORA:=8}" "${LORA_LR:=1e-3}" "${DP_EVAL:=key}" "${WISEFT_ALPHAS:=0.25 0.5 0.75}"
      : "${COSTS:=60 70 15 60 15 20}"
      # variants: the frontier (AdamW at every lr, SAM, the schedule control; 6 seeds) and the variants on
      # it; nothing else (REMEDIES=0). After `bash run_all.sh` into the same OUT it adds only the variants.
      [[ $PROFILE != variants ]] || : "${VARIANTS:=asam looksam-k5 msam samon sam-k5}" "${REMEDIES:=0}"
    else
      : "${TASKS:=paper arc_easy piqa sciq}" "${LIMIT:=100 arc_easy=300 piqa=300 copa=0 sciq=300}"
      : "${MICRO:=8}" "${TRAIN_LIMIT:=128}" "${BATCH:=16}" "${HELDOUT:=64}" "${EVAL_EVERY:=4}" "${GENERAL_N:=128}" "${LORA:=8}"
      : "${CANDIDATES:=mt-mbpp-haskell:1e-4:2 mt-mbpp-haskell:1e-3:2 jeopardy:1e-3:2 rot13:1e-3:2}"
      : "${RHOS:=0.01 0.02 0.05 0.1 0.2 2}" "${OTHER_DATA:=jeopardy gsm8k}"
      : "${DISTANCE_NEAR:=naturalqs gsm8k mt-mbpp-haskell}" "${LS_STEPS:=9}" "${LS_BATCHES:=8}"
      : "${LRS:=3e-5 1e-4 5e-4 1e-3}" "${SAM_LR2:=1e-3}" "${FEW_SEEDS:=0 1 2 3 4 5}" "${FP32_N:=2}"
      : "${CALIBRATE:=0}" "${STAGE2_DATA:=rot13}" "${STAGE2_LR:=3e-4}" "${LORA_LR:=1e-3}" "${SEEDS:=6}"
      : "${SAM2_N:=6}" "${VERDICT_DATA2:=gsm8k}" "${COSTS:=600 300 30 300 15 40}"
    fi ;;
  paper)
    : "${MODEL:=meta-llama/Llama-2-7b-hf}" "${STAGE1_DATA:=alpaca}" "${STAGE1_ARGS:=--epochs 3 --lr 2e-5}"
    : "${SIZE_MODELS:=TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T meta-llama/Llama-2-13b-hf}"
    : "${TASKS:=paper}" "${LIMIT:=}" "${DTYPE:=bf16}" "${PRECISION:=bf16}" "${TRAIN_LIMIT:=}"
    : "${HELDOUT:=200}" "${MAX_LEN:=512}" "${BATCH:=128}" "${MICRO:=4}" "${STAGE2_DATA:=open-platypus}"
    : "${STAGE2_LR:=5e-6}" "${CALIBRATE:=0}" "${RHOS:=2}" "${SEEDS:=1}" "${OTHER_DATA:=sharegpt metamath}"
    : "${DISTANCE_DATA:=open-platypus auto-wiki}" "${REHEARSAL_DATA:=alpaca}" "${REHEARSAL_RATIO:=0.1}"
    : "${LANDSCAPE_DATA:=alpaca}" "${LS_STEPS:=21}" "${LS_BATCHES:=32}" "${LS_BATCH_SIZE:=4}"
    : "${NPROC:=16}" "${EVAL_EVERY:=50}" "${GENERAL_N:=512}" "${COSTS:=7200 1800 120 3600 300 120}" ;;
  *) echo "run_all.sh: error: unknown PROFILE=$PROFILE; use smol, tiny, smol-full or paper." >&2; exit 2 ;;
esac
# settings shared by the profiles (each overridable)
: "${OUT:=results$([[ $PROFILE == smol || $PROFILE == variants ]] || echo "-$PROFILE")}" "${NPROC:=1}" "${DRY_RUN:=0}" "${VERBOSE:=0}"
: "${PYTHON:=python}" "${STAGE1_DATA:=}"
: "${STAGE1_ARGS:=}" "${SIZE_MODELS:=}" "${STAGE2_DATA:=}" "${STAGE2_LR:=}" "${STAGE2_EPOCHS:=2}"
: "${CALIBRATE:=$([[ -n $STAGE2_DATA ]] && echo 0 || echo 1)}" "${CANDIDATES:=}" "${DISTANCE_NEAR:=}"
: "${DISTANCE_DATA:=}" "${REHEARSAL_DATA:=naturalqs}" "${REHEARSAL_RATIO:=0.25}" "${WISEFT_ALPHA:=0.5}"
: "${LANDSCAPE_DATA:=$REHEARSAL_DATA}" "${LS_RANGE:=0.1}" "${LS_DTYPE:=$DTYPE}" "${TORCHRUN_ARGS:=}"
: "${WISEFT_ALPHAS:=0 0.25 0.5 0.75 1}" "${EVAL_EVERY:=4}" "${GENERAL_N:=128}" "${LORA:=}" "${DP_EVAL:=all}"
# the frontier: AdamW's learning rates (besides STAGE2_LR), SAM's second learning rate, the seeds of the runs
# that are not the verdict's (rehearsal, LoRA, Wise-FT's alpha curve, SAM at SAM_LR2 get FEW_SEEDS, at most
# 3 of SEEDS: reported, not judged, below 3), the seeds replicated in fp32 compute, and each run's warmup
: "${LRS:=}" "${SAM_LR2:=}" "${FEW_SEEDS:=}" "${FP32_N:=0}" "${WARMUP:=2}" "${LORA_LR:=}"
: "${CAL_ALL:=0}" "${CAL_METRIC:=p}"
: "${LANDSCAPES:=1}" "${MATCHED_DP:=1}" "${SEED_EVALS:=1}" "${VERDICT_DATA2:=}" "${VARIANTS:=}"
# REMEDIES=0: the frontier study alone, without SAM at SAM_LR2, the fp32 replication, the second task, Wise-FT,
# rehearsal, LoRA and the remedies' extra seeds (PROFILE=variants)
: "${REMEDIES:=1}"
[[ $REMEDIES == 1 ]] || SAM_LR2='' FP32_N=0 VERDICT_DATA2='' FEW_SEEDS='' LANDSCAPES=0
FRONTIER_ONLY=0                       # 1 while stage2 runs fine-tunes that need no evaluation of their own
[[ $DP_EVAL == all || $DP_EVAL == key ]] || { echo "run_all.sh: error: DP_EVAL=$DP_EVAL; use all (every \
model gets the multiple-choice evaluation) or key (the first seed's models of the tables)." >&2; exit 2; }
[[ $LIMIT != 0 && $LIMIT != all ]] || LIMIT=              # 0 or all: every item
[[ $TRAIN_LIMIT != 0 && $TRAIN_LIMIT != all ]] || TRAIN_LIMIT=
if [[ $SEEDS =~ ^[[:space:]]*[0-9]+[[:space:]]*$ ]]; then  # one number N: N seeds, 0 .. N-1
  (( SEEDS > 0 )) || { echo "run_all.sh: error: SEEDS=$SEEDS runs no seed; give a count (SEEDS=3: seeds 0 1 2) \
or a list of seeds (SEEDS=\"0 7\")." >&2; exit 2; }
  SEEDS=$(seq -s ' ' 0 $((SEEDS - 1)))
fi
: "${SAM2_SEEDS:=$(cut -d' ' -f1-"${SAM2_N:-1}" <<<"$SEEDS")}"   # SAM at SAM_LR2: the first SAM2_N seeds
FP32_SEEDS=$( ((FP32_N > 0)) && cut -d' ' -f1-"$FP32_N" <<<"$SEEDS" || true)     # the fp32 replication's seeds
if [[ $PROFILE != paper ]]; then  # the offline profiles never wait on the hub
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
fi
read -r C_FT C_EVAL C_HELD C_LS C_WISEFT C_PROBE <<<"$COSTS"   # rough seconds per step, for the time left
C_PROBE=${C_PROBE:-$C_WISEFT}
(( STAGE2_EPOCHS % 2 == 0 && STAGE2_EPOCHS > 0 )) || {
  echo "run_all.sh: error: STAGE2_EPOCHS=$STAGE2_EPOCHS must be even (SAM runs half as many epochs)." >&2; exit 2; }
EXTRA=("$@")
if (( NPROC > 1 )); then
  read -ra LAUNCH <<<"torchrun --nproc_per_node $NPROC $TORCHRUN_ARGS"
else
  LAUNCH=("$PYTHON")
fi
TRAIN=(--batch-size "$BATCH" --micro-batch-size "$MICRO" --max-len "$MAX_LEN" --heldout "$HELDOUT"
       --precision "$PRECISION" --warmup-steps "$WARMUP" ${TRAIN_LIMIT:+--limit "$TRAIN_LIMIT"})
ROOT_ARGS=()                          # extra finetune.py flags of one sub-study (fp32: --precision fp32)
GENERAL=$OUT/general_text.jsonl       # the old-knowledge text every trajectory point and probe measures
TRAJ=(--eval-every "$EVAL_EVERY" --general-text "$GENERAL" --probe-cache "$OUT/probe_cache")  # the start, once
read -ra TASK_LIST <<<"$TASKS"
read -ra LIMITS <<<"$LIMIT"            # "40 arc_easy=150": 40 items per task, 150 of arc_easy
EVAL=(--tasks "${TASK_LIST[@]}" ${LIMIT:+--limit "${LIMITS[@]}"} --dtype "$DTYPE" --max-len "$MAX_LEN")
SEED0=${SEEDS%% *}                    # the rho sweep, Wise-FT, rehearsal and other data use the first seed

fmt() {  # seconds -> 4m05s, or 2h10m
  if (($1 >= 3600)); then printf '%dh%02dm' $(($1 / 3600)) $(($1 % 3600 / 60))
  else printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); fi
}
say() { echo "[run_all $(fmt $((SECONDS - START)))] $*"; }
die() { echo "run_all.sh: error: $*" >&2; exit 2; }
dtag() { local b=${1%/}; b=${b##*/}; b=${b%.jsonl}; echo "${b%.json}"; }   # data set -> name part
where() { local r=${1#"$OUT"}; echo "${r:+${r#/}/}"; }   # ROOT -> "" or "sizes/<model>/" (for labels)
# DATA LR EPOCHS METHOD SEED [rh|lora<r>] -> the folder name study.run_name gives (tests/test_run_all.py checks it)
run_name() { echo "$(dtag "$1")_lr$2_e$3_$4${6:+_$6}_s$5"; }

# step COST DONE LABEL CMD...: run CMD unless DONE exists. The plan pass only counts (and, with
# DRY_RUN=1, prints); the run pass runs, logs to $OUT/logs and prints progress with the time left.
step() {
  local cost=$1 done=$2 label=$3; shift 3
  [[ -z ${SEEN[$done]:-} ]] || return 0   # a model several tables need is trained once
  SEEN[$done]=1
  if [[ -e $done ]]; then
    [[ $MODE == plan ]] || say "skip  $label ($done exists)"
    return 0
  fi
  if [[ $MODE == plan ]]; then
    TODO=$((TODO + 1)) TODO_COST=$((TODO_COST + cost))
    if [[ $DRY_RUN == 1 ]]; then printf '%q ' "$@"; echo; fi
    return 0
  fi
  N=$((N + 1))
  local log=$OUT/logs/${label//[ \/:]/_}.log t0=$SECONDS rc=0
  say "[$N/$TODO] $label"
  mkdir -p "$OUT/logs"
  if [[ $VERBOSE == 1 ]]; then "$@" 2>&1 | tee "$log" || rc=$?; else "$@" >"$log" 2>&1 || rc=$?; fi
  if (( rc != 0 )); then
    tail -n 25 "$log" >&2
    die "step '$label' failed (exit $rc); full log: $log. Fix it and rerun: finished steps are kept."
  fi
  RAN_S=$((RAN_S + SECONDS - t0)) DONE_COST=$((DONE_COST + cost))
  local left=$(((TODO_COST - DONE_COST) * RAN_S / (DONE_COST > 0 ? DONE_COST : 1)))
  say "[$N/$TODO] done in $(fmt $((SECONDS - t0))); about $(fmt $((left > 0 ? left : 0))) left"
}

stage1() {  # stage1 MODEL ROOT: sets STAGE1, the instruction-tuned model that stage 2 starts from
  STAGE1=$1
  [[ -n $STAGE1_DATA ]] || return 0
  STAGE1=$2/runs/stage1
  # shellcheck disable=SC2086  # STAGE1_ARGS is a list of flags
  step "$C_FT" "$STAGE1/final.json" "stage 1 $(dtag "$1") on $STAGE1_DATA" "${LAUNCH[@]}" finetune.py \
    --model "$1" --data "$STAGE1_DATA" --out "$STAGE1" $STAGE1_ARGS "${TRAIN[@]}" "${EXTRA[@]}"
}

evaluate() {  # evaluate ROOT NAME MODEL HELDOUT_FILE: general tasks + held-out in-domain loss
  step "$C_EVAL" "$1/evals/$2/results.json" "evaluate $(where "$1")$2" "${LAUNCH[@]}" evaluate.py --model "$3" \
    "${EVAL[@]}" --heldout "$4" --baseline "$1/evals/stage1" --out "$1/evals/$2"
}

# stage2 ROOT DATA adamw|sam<rho> SEED [rh|lora<r>] [key]: one fine-tune of STAGE1 logging its trajectory,
# then its evaluations: the multiple-choice one when DP_EVAL=all or the run is `key` (a table needs its Δp),
# else the held-out loss only (heldout/<name>: the in-domain gain)
# An optional 7th and 8th argument set the learning rate (default STAGE2_LR) and the epochs (default: AdamW
# STAGE2_EPOCHS, SAM half); ROOT_ARGS go to the fine-tune too (the fp32 sub-study's --precision fp32).
stage2() {
  local root=$1 data=$2 method=$3 seed=$4 tag=${5:-} key=${6:-} lr=${7:-$STAGE2_LR} epochs=$STAGE2_EPOCHS opt=()
  if [[ $method == sam* ]]; then epochs=$((STAGE2_EPOCHS / 2)) opt=(--sam --rho "${method#sam}"); fi
  epochs=${8:-$epochs}
  [[ $tag != rh ]] || opt+=(--rehearsal "$REHEARSAL_DATA" --rehearsal-ratio "$REHEARSAL_RATIO")
  [[ $tag != lora* ]] || opt+=(--lora "${tag#lora}")
  if [[ $tag == v-* ]]; then            # a SAM variant: v-<variant>[-k<interval>] (PROFILE=variants)
    local spec=${tag#v-}
    opt+=(--sam-variant "${spec%%-k*}")
    [[ $spec != *-k* ]] || opt+=(--sam-interval "${spec##*-k}")
  fi
  local name run held
  name=$(run_name "$data" "$lr" "$epochs" "$method" "$seed" "$tag")
  run=$root/runs/$name held=$root/runs/$name/heldout.jsonl
  step "$C_FT" "$run/final.json" "finetune $(where "$root")$name" "${LAUNCH[@]}" finetune.py --model "$STAGE1" \
    --data "$data" --out "$run" "${opt[@]}" --epochs "$epochs" --lr "$lr" --seed "$seed" \
    "${TRAIN[@]}" "${TRAJ[@]}" "${ROOT_ARGS[@]}" "${EXTRA[@]}"
  [[ $FRONTIER_ONLY != 1 || -n $key ]] || return 0   # a frontier run: its trajectory is all the verdict needs
  local base=$root/evals/stage1_heldout_$(dtag "$data")
  step "$C_HELD" "$base/results.json" "held-out loss of $(where "$root")stage1 on $(dtag "$data")" "${LAUNCH[@]}" \
    evaluate.py --model "$STAGE1" --tasks none --heldout "$held" --dtype "$DTYPE" --max-len "$MAX_LEN" --out "$base"
  if [[ $DP_EVAL == all || -n $key ]]; then
    evaluate "$root" "$name" "$run" "$held"
  else
    step "$C_HELD" "$root/heldout/$name/results.json" "held-out loss of $(where "$root")$name" "${LAUNCH[@]}" \
      evaluate.py --model "$run" --tasks none --heldout "$held" --dtype "$DTYPE" --max-len "$MAX_LEN" \
      --out "$root/heldout/$name"
  fi
}

# matched_adamw SAM_RUN: the end-point Δp comparison at matched learning. study.py matched-step picks the first
# AdamW run's trajectory step k nearest SAM_RUN's final held-out loss; unless that is step 0 (stage 1) or the run's
# end (both evaluated already), AdamW is rerun to step k (same seed: the same weights), its model kept in
# runs/<adamw>_step<k>/step<k>/ and evaluated like every model of the tables
matched_adamw() {
  local adamw k name run pick
  adamw=$(run_name "$STAGE2_DATA" "$STAGE2_LR" "$STAGE2_EPOCHS" adamw "$SEED0")
  [[ -f $OUT/runs/$adamw/final.json && -f $OUT/runs/$1/final.json ]] || {
    unknown "the AdamW step at SAM's held-out loss"; return 0; }
  known "the AdamW step at SAM's held-out loss"
  pick=$("$PYTHON" study.py matched-step "${REPORT[@]}")
  read -r k name <<<"$pick"
  [[ $name == "${adamw}_step$k" ]] || return 0
  run=$OUT/runs/$name
  step $((C_FT / 2)) "$run/step$k/config.json" "finetune $name (AdamW rerun to the step of SAM's held-out loss)" \
    "${LAUNCH[@]}" finetune.py --model "$STAGE1" --data "$STAGE2_DATA" --out "$run" --epochs "$STAGE2_EPOCHS" \
    --lr "$STAGE2_LR" --seed "$SEED0" --stop-after "$k" --save-model-at "$k" "${TRAIN[@]}" "${TRAJ[@]}" "${EXTRA[@]}"
  [[ $MODE == plan ]] || rm -rf "$run/checkpoint"     # the kept model is step<k>/; no resume wanted
  evaluate "$OUT" "$name" "$run/step$k" "$OUT/runs/$adamw/heldout.jsonl"
}

# frontier_seed ROOT SEED [nocontrol]: AdamW at every learning rate of the sweep, SAM (the study's radius) at
# the main learning rate and (unless nocontrol) the schedule control, AdamW with SAM's steps and schedule
frontier_seed() {  # frontier_seed ROOT SEED [nocontrol]
  local lr
  stage2 "$1" "$STAGE2_DATA" adamw "$2"                 # the tables' runs (evaluated when SEED_EVALS=1)
  stage2 "$1" "$STAGE2_DATA" "sam$BEST_RHO" "$2"
  local FRONTIER_ONLY=1                                 # the sweep's other runs: the verdict's alone
  for lr in $LRS; do stage2 "$1" "$STAGE2_DATA" adamw "$2" "" "" "$lr"; done
  [[ -n ${3:-} ]] || stage2 "$1" "$STAGE2_DATA" adamw "$2" "" "" "$STAGE2_LR" $((STAGE2_EPOCHS / 2))
}

# frontier ROOT SAM0: the verdict's runs (verdict.py): every seed's frontier_seed, SAM at its second learning
# rate on SAM2_SEEDS, and probe.py's point of the stage-1 model (Wise-FT's points are measured like it)
frontier() {
  local s FRONTIER_ONLY=$((1 - SEED_EVALS))
  for s in $SEEDS; do frontier_seed "$1" "$s"; done
  FRONTIER_ONLY=1
  if [[ -n $SAM_LR2 ]]; then
    for s in $SAM2_SEEDS; do stage2 "$1" "$STAGE2_DATA" "sam$BEST_RHO" "$s" "" "" "$SAM_LR2"; done
  fi
  step "$C_PROBE" "$1/runs/stage1_probe/point.json" "probe stage1" "${LAUNCH[@]}" probe.py "$STAGE1" \
    --start "$STAGE1" --general-text "$GENERAL" --heldout "$1/runs/$2/heldout.jsonl" --max-len "$MAX_LEN" \
    --out "$1/runs/stage1_probe/point.json"
}

probe() {  # probe ROOT NAME HELDOUT_FILE: probe.py's trajectory point of a model the study did not train
  step "$C_PROBE" "$1/runs/$2/point.json" "probe $2" "${LAUNCH[@]}" probe.py "$1/runs/$2" --start "$STAGE1" \
    --general-text "$GENERAL" --heldout "$3" --max-len "$MAX_LEN" --out "$1/runs/$2/point.json"
}

# wiseft ROOT DATA METHOD ALPHA [eval] [SEED]: interpolate STAGE1 and the run of SEED (default the first),
# probe the point on the frontier, and with `eval` run the multiple-choice evaluation (Table 2(c))
wiseft() {
  local epochs=$STAGE2_EPOCHS
  [[ $3 != sam* ]] || epochs=$((STAGE2_EPOCHS / 2))
  local name; name=$(run_name "$2" "$STAGE2_LR" "$epochs" "$3" "${6:-$SEED0}")
  local out=$1/runs/${name}_wiseft$4
  step "$C_WISEFT" "$out/wiseft.json" "wiseft $name alpha $4" "$PYTHON" wiseft.py --base "$STAGE1" \
    --finetuned "$1/runs/$name" --alpha "$4" --out "$out"
  probe "$1" "${name}_wiseft$4" "$1/runs/$name/heldout.jsonl"
  [[ -z ${5:-} ]] || evaluate "$1" "${name}_wiseft$4" "$out" "$1/runs/$name/heldout.jsonl"
}

landscape() {  # landscape ROOT NAME MODEL: loss surface on the old-data stand-in, shared directions
  step "$C_LS" "$1/landscape/$2/metrics.json" "landscape $2" "${LAUNCH[@]}" landscape.py --model "$3" \
    --data "$LANDSCAPE_DATA" --out "$1/landscape/$2" --range "$LS_RANGE" --steps "$LS_STEPS" \
    --batches "$LS_BATCHES" --batch-size "$LS_BATCH_SIZE" --max-len "$MAX_LEN" --dtype "$LS_DTYPE" \
    --directions "$1/landscape/directions.pt"
}

# unknown WHAT / known WHAT: the steps after this point depend on a result WHAT (the calibrated stage 2, the
# best radius, the matched step). While it is not measured the plan pass stops there (`unknown`; a dry run
# says so); once the run pass has measured it (`known`), the rest is planned again from the files, so the
# plan never holds a guessed name.
unknown() {
  [[ $MODE == plan ]] || die "$1 is not measured though its steps ran; see $OUT/logs/."
  OPEN=$1
}
known() {
  [[ $MODE == run && $OPEN == "$1" ]] || return 0
  say "measured $1: planning the rest"; export OUT; exec bash "$PWD/run_all.sh" "${EXTRA[@]}"
}

# calibration: sets STAGE2_DATA, STAGE2_LR, STAGE2_EPOCHS. With CALIBRATE=1 each candidate DATA:LR:EPOCHS is
# one AdamW fine-tune of the study (seed SEED0), evaluated like its models, mildest first; calibrate.py judges
# them (it runs nothing) and the run pass stops at the first that passes (CAL_ALL=1: runs them all).
calibration() {
  if [[ $CALIBRATE != 1 ]]; then
    [[ -n $STAGE2_DATA && -n $STAGE2_LR ]] || die "CALIBRATE=0 needs STAGE2_DATA and STAGE2_LR \
(for example STAGE2_DATA=mt-mbpp-haskell STAGE2_LR=3e-4)."
    return 0
  fi
  local c d lr e tried=() judge
  if [[ -f $OUT/calibration.json ]]; then CANDIDATES=''   # chosen already: its run is the study's first AdamW run
  elif [[ -z $CANDIDATES ]]; then die "CALIBRATE=1 needs CANDIDATES (DATA:LR:EPOCHS, mildest first), or give \
STAGE2_DATA and STAGE2_LR instead."; fi
  for c in $CANDIDATES; do
    IFS=: read -r d lr e <<<"$c"
    [[ -n $d && -n $lr && -n $e ]] || die "CANDIDATES holds '$c'; give DATA:LR:EPOCHS (for example rot13:1e-3:2)."
    tried+=("$c")
    judge=(calibrate.py --out "$OUT" --seed "$SEED0" --metric "$CAL_METRIC" --candidates "${tried[@]}")
    stage2 "$OUT" "$d" adamw "$SEED0" "" key "$lr" "$e"
    [[ $MODE == run && $CAL_ALL != 1 ]] || continue
    "$PYTHON" "${judge[@]}" --check && break
  done
  [[ -z $CANDIDATES ]] || step "$C_HELD" "$OUT/calibration.json" "choose among the candidates" "$PYTHON" "${judge[@]}"
  [[ -f $OUT/calibration.json ]] || { unknown "calibrate.py's choice of the stage-2 setting"; return 1; }
  known "calibrate.py's choice of the stage-2 setting"
  read -r STAGE2_DATA STAGE2_LR STAGE2_EPOCHS <<<"$("$PYTHON" calibrate.py --show "$OUT/calibration.json")"
}

best_rho() {  # sets BEST_RHO: least forgetting among the radii that clearly learn (study.py best-rho)
  BEST_RHO=${RHOS%% *}
  [[ $RHOS == *" "* ]] || return 0
  local rho e=$((STAGE2_EPOCHS / 2))
  for rho in $RHOS; do
    [[ -f $OUT/evals/$(run_name "$STAGE2_DATA" "$STAGE2_LR" "$e" "sam$rho" "$SEED0")/results.json ]] || {
      unknown "the best radius of the rho sweep"; return 1; }
  done
  known "the best radius of the rho sweep"
  BEST_RHO=$("$PYTHON" study.py best-rho "${REPORT[@]}")
}

study() {
  local d a
  stage1 "$MODEL" "$OUT"
  MAIN_STAGE1=$STAGE1
  step "$C_HELD" "$GENERAL" "general text" "$PYTHON" data.py --general-text "$GENERAL" --model "$STAGE1" \
    --n "$GENERAL_N"
  step "$C_EVAL" "$OUT/evals/stage1/results.json" "evaluate stage1" "${LAUNCH[@]}" evaluate.py \
    --model "$STAGE1" "${EVAL[@]}" --out "$OUT/evals/stage1"
  calibration || return 0
  DIST=${DISTANCE_DATA:-$DISTANCE_NEAR $STAGE2_DATA}
  REPORT=(--out "$OUT" --profile "$PROFILE" --model "$MODEL" --stage1 "$MAIN_STAGE1" --data "$STAGE2_DATA"
          --lr "$STAGE2_LR" --epochs "$STAGE2_EPOCHS" --other-data $OTHER_DATA --distance-data $DIST
          --rhos $RHOS --seeds $SEEDS --wiseft-alpha "$WISEFT_ALPHA" --rehearsal-data "$REHEARSAL_DATA"
          --rehearsal-ratio "$REHEARSAL_RATIO" --landscape-data "$LANDSCAPE_DATA" --size-models $SIZE_MODELS
          --wiseft-alphas $WISEFT_ALPHAS ${LORA:+--lora "$LORA"})
  stage2 "$OUT" "$STAGE2_DATA" adamw "$SEED0" "" key
  for rho in $RHOS; do  # one radius: it is the study's, and a table needs its multiple-choice numbers
    stage2 "$OUT" "$STAGE2_DATA" "sam$rho" "$SEED0" "" $([[ $RHOS == *" "* ]] || echo key)
  done
  best_rho || return 0
  local sam0; sam0=$(run_name "$STAGE2_DATA" "$STAGE2_LR" $((STAGE2_EPOCHS / 2)) "sam$BEST_RHO" "$SEED0")
  [[ $DP_EVAL == all ]] || evaluate "$OUT" "$sam0" "$OUT/runs/$sam0" "$OUT/runs/$sam0/heldout.jsonl"
  frontier "$OUT" "$sam0"
  for v in $VARIANTS; do     # the SAM variants (sam.py) at SAM's lr and epochs on every seed: PROFILE=variants
    FRONTIER_ONLY=1
    for s in $SEEDS; do stage2 "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$s" "v-$v"; done
    FRONTIER_ONLY=0
  done
  for s in $FP32_SEEDS; do   # numerics as a factor: the frontier and the primary SAM again in fp32 compute
    ROOT_ARGS=(--precision fp32) FRONTIER_ONLY=1
    frontier_seed "$OUT/fp32" "$s" nocontrol
    ROOT_ARGS=() FRONTIER_ONLY=0
  done
  for d in $VERDICT_DATA2; do  # the verdict replicated on a second task: OUT/task-<data>/
    local main=$STAGE2_DATA
    STAGE2_DATA=$d FRONTIER_ONLY=1
    frontier "$OUT/task-$(dtag "$d")" "$(run_name "$d" "$STAGE2_LR" $((STAGE2_EPOCHS / 2)) "sam$BEST_RHO" "$SEED0")"
    STAGE2_DATA=$main FRONTIER_ONLY=0
  done
  if [[ $REMEDIES == 1 ]]; then
    for a in $WISEFT_ALPHAS; do wiseft "$OUT" "$STAGE2_DATA" adamw "$a" $([[ $a == "$WISEFT_ALPHA" ]] && echo eval); done
    wiseft "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$WISEFT_ALPHA" eval
    stage2 "$OUT" "$STAGE2_DATA" adamw "$SEED0" rh key
    stage2 "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$SEED0" rh key
  fi
  if [[ -n $LORA && $REMEDIES == 1 ]]; then
    stage2 "$OUT" "$STAGE2_DATA" adamw "$SEED0" "lora$LORA" "" "${LORA_LR:-$STAGE2_LR}"
    stage2 "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$SEED0" "lora$LORA" "" "${LORA_LR:-$STAGE2_LR}"
  fi
  for s in $FEW_SEEDS; do   # the remedies on more seeds than the first (verdict.py judges them from 3 seeds)
    [[ $s == "$SEED0" ]] && continue
    FRONTIER_ONLY=1
    wiseft "$OUT" "$STAGE2_DATA" adamw "$WISEFT_ALPHA" "" "$s"
    stage2 "$OUT" "$STAGE2_DATA" adamw "$s" rh
    stage2 "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$s" rh
    if [[ -n $LORA ]]; then
      stage2 "$OUT" "$STAGE2_DATA" adamw "$s" "lora$LORA" "" "${LORA_LR:-$STAGE2_LR}"
      stage2 "$OUT" "$STAGE2_DATA" "sam$BEST_RHO" "$s" "lora$LORA" "" "${LORA_LR:-$STAGE2_LR}"
    fi
    FRONTIER_ONLY=0
  done
  for d in $OTHER_DATA; do
    stage2 "$OUT" "$d" adamw "$SEED0" "" key
    stage2 "$OUT" "$d" "sam$BEST_RHO" "$SEED0" "" key
  done
  if [[ $LANDSCAPES == 1 ]]; then  # Table 1: data sets of increasing distance and their loss landscapes
    for d in $DIST; do stage2 "$OUT" "$d" adamw "$SEED0" "" key; done
    landscape "$OUT" stage1 "$STAGE1"
    for d in $DIST; do
      d=$(run_name "$d" "$STAGE2_LR" "$STAGE2_EPOCHS" adamw "$SEED0")
      landscape "$OUT" "$d" "$OUT/runs/$d"
    done
  fi
  for m in $SIZE_MODELS; do  # Table 2(b): stage 1 and AdamW vs SAM on the main data, per model size
    local root; root=$OUT/sizes/$(dtag "$m")
    stage1 "$m" "$root"
    step "$C_EVAL" "$root/evals/stage1/results.json" "evaluate stage1 $(dtag "$m")" "${LAUNCH[@]}" \
      evaluate.py --model "$STAGE1" "${EVAL[@]}" --out "$root/evals/stage1"
    stage2 "$root" "$STAGE2_DATA" adamw "$SEED0" "" key
    stage2 "$root" "$STAGE2_DATA" "sam$BEST_RHO" "$SEED0" "" key
  done
  [[ $MATCHED_DP != 1 ]] || matched_adamw "$sam0"   # last: its step is known once SAM's run is measured
}

settings() {  # what the files in $OUT depend on; a resumed study must match it
  printf '%s\n' "MODEL=$MODEL" "STAGE1_DATA=$STAGE1_DATA" "STAGE1_ARGS=$STAGE1_ARGS" "TASKS=$TASKS" \
    "LIMIT=$LIMIT" "DTYPE=$DTYPE" "PRECISION=$PRECISION" "TRAIN_LIMIT=$TRAIN_LIMIT" "HELDOUT=$HELDOUT" \
    "MAX_LEN=$MAX_LEN" "BATCH=$BATCH" "MICRO=$MICRO" "REHEARSAL_DATA=$REHEARSAL_DATA" \
    "REHEARSAL_RATIO=$REHEARSAL_RATIO" "LANDSCAPE_DATA=$LANDSCAPE_DATA" "LS_RANGE=$LS_RANGE" \
    "LS_STEPS=$LS_STEPS" "LS_BATCHES=$LS_BATCHES" "LS_BATCH_SIZE=$LS_BATCH_SIZE" "LS_DTYPE=$LS_DTYPE" \
    "EVAL_EVERY=$EVAL_EVERY" "GENERAL_N=$GENERAL_N" "WARMUP=$WARMUP" "FINETUNE_ARGS=${EXTRA[*]}"
}

START=$SECONDS
declare -A SEEN=()
MODE=plan TODO=0 TODO_COST=0 OPEN= REPORT=()
study
if [[ $DRY_RUN == 1 ]]; then
  [[ -z $OPEN ]] || echo "# then the steps that depend on $OPEN: a run plans them once it is measured"
  [[ -z ${REPORT[*]:-} ]] || { printf '%q ' "$PYTHON" report.py "${REPORT[@]}"; echo; }
  echo "# PROFILE=$PROFILE: $TODO steps${OPEN:+ so far}, roughly $(fmt "$TODO_COST") on the machine the costs assume (COSTS)"
  exit 0
fi
mkdir -p "$OUT"
if [[ -f $OUT/study.txt ]] && ! diff -q <(settings) "$OUT/study.txt" >/dev/null; then
  diff <(settings) "$OUT/study.txt" | grep '^[<>]' >&2 || true
  die "$OUT/ holds a study run with other settings (< now, > there); use OUT=another_folder or remove $OUT/."
fi
settings >"$OUT/study.txt"
say "PROFILE=$PROFILE into $OUT/: $TODO steps to run${OPEN:+ before $OPEN is measured}, roughly $(fmt "$TODO_COST") estimated"
SEEN=() MODE=run N=0 RAN_S=0 DONE_COST=0
study
say "report: $PYTHON report.py ${REPORT[*]}"
"$PYTHON" report.py "${REPORT[@]}"
say "done: $OUT/REPORT.md"
