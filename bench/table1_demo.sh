#!/bin/bash
# Table 1 at demo scale, end to end with csd-jax alone (28 min measured on a 2-core CPU):
# SmolLM2-135M-Instruct (the embedded demo's teacher) and its 4-layer student, trained by
# CSD, FKL (`csd-jax demo`, 60 steps each) and SFT on the same data (teacher: null), each
# judged by the official protocol (csd-jax eval's default: 5 seeds, 256 new tokens,
# no_repeat_ngram_size 6) on the demo's 32 held-out prompts (references: the teacher's greedy
# answers), then `csd-jax report`. Prints the time of each part; the table is in $W/table.md.
#   bash bench/table1_demo.sh [WORKDIR]          (default workdirs/table1-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/table1-demo}
CLI=${CSD_JAX:-.venv/bin/csd-jax}
mkdir -p "$W"
timed() { local name=$1; shift; local start=$SECONDS; "$@"; echo "TIME $name $((SECONDS - start)) s" | tee -a "$W/times.txt"; }
timed demo_csd "$CLI" demo --loss csd --workdir "$W/csd"
timed demo_fkl "$CLI" demo --loss fkl --workdir "$W/fkl"
C=$W/csd; S=$C/assets/student_init; T=$C/assets/smollm2-135m-instruct
DATA=(--data "heldout=$C/data/eval.jsonl")
timed sft_train "$CLI" train --config configs/demo.yaml --workdir "$W/sft" teacher=null \
  loss.kd_coef=0 loss.ce_coef=1 student.path="$S" "data.train_files=[$C/data/train.jsonl]" \
  "data.eval_files=[$C/data/eval.jsonl]" data.data_dir="$C/tfds" data.tokenizer="$T"
timed eval_sft "$CLI" eval --workdir "$W/sft" "${DATA[@]}"
timed eval_fkl "$CLI" eval --workdir "$W/fkl/run_fkl" "${DATA[@]}"
timed eval_csd "$CLI" eval --workdir "$C/run_csd" "${DATA[@]}"
timed eval_init "$CLI" eval --model "$S" --template chat "${DATA[@]}" --out "$W/init.json"
timed eval_teacher "$CLI" eval --model "$T" --template chat "${DATA[@]}" --out "$W/teacher.json"
"$CLI" report "Teacher (SmolLM2-135M-Instruct)=$W/teacher.json" \
  "Student init (4 of 30 layers)=$W/init.json" "SFT=$W/sft" "FKL=$W/fkl/run_fkl" \
  "CSD=$C/run_csd" --out "$W/table.md"
