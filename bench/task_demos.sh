#!/bin/bash
# The paper's task-specific and chat-pair recipes at demo scale, end to end with csd-jax alone,
# offline on a CPU: SmolLM2-135M-Instruct (the embedded demo's teacher) and its 4-layer student.
#   gsm8k: SFT of the teacher on GSM8K-style problems, export, CSD (T,S) per sequence (the
#          official GSM8K weighting) into the student, `csd-jax eval --task gsm8k`;
#   summ:  the same on DialogSum-style dialogues, CSD with the official mixture a = 0.15,
#          `csd-jax eval --task summarization`;
#   pairs: `csd-jax generate` (teacher and student, temperature 0.8) on held-out-free chat
#          prompts, the official pair file, CSD (S,S) with the pair objective (beta 1 -> 1.5),
#          `csd-jax eval` (ROUGE-L against the teacher's greedy answers) and an AlpacaEval file.
# Data: bench/task_demo_data.py (made from templates; the real files cannot be downloaded here).
# Prints the time of each part; each evaluator's table is printed and kept under $W.
#   bash bench/task_demos.sh [WORKDIR] [gsm8k summ pairs]     (default workdirs/task-demos, all)
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-workdirs/task-demos}
shift || true
PARTS=${*:-gsm8k summ pairs}
CLI=${CSD_JAX:-.venv/bin/csd-jax}
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-40}           # optimizer steps of each distillation (4-layer student)
SFT_STEPS=${SFT_STEPS:-10}   # of each SFT of the teacher (all 30 layers: ~30 s a step on 2 cores)
EXAMPLES=${EXAMPLES:-32}     # evaluation examples per task (and held-out chat prompts)
PAIR_PROMPTS=${PAIR_PROMPTS:-128}  # chat prompts answered by teacher and student (of the demo's
                                   # 256; the held-out ones are the last EXAMPLES)
mkdir -p "$W"
timed() { local name=$1; shift; local start=$SECONDS; "$@"; echo "TIME $name $((SECONDS - start)) s" | tee -a "$W/times.txt"; }

A=$W/assets; D=$W/data; T=$A/smollm2-135m-instruct; S=$A/student_init
timed assets "$PY" -c "
import pathlib, sys
from csd_jax.demo.assets import converted_smollm2
from csd_jax.demo.command import STUDENT_LAYERS
from csd_jax.models.io.layer_drop import layer_dropped_copy
root = pathlib.Path(sys.argv[1]); teacher = converted_smollm2(root)
if not (root / 'student_init' / 'config.json').exists():
  layer_dropped_copy(teacher, root / 'student_init', STUDENT_LAYERS)
" "$A"
"$PY" bench/task_demo_data.py "$D" --test "$EXAMPLES"

# One task: SFT the teacher ($2: its data), export it, distil it ($3: loss params) into the
# student, evaluate teacher, student init and distilled student with `csd-jax eval --task $1`.
task() {
  local task=$1 train=$2 params=$3 test=$4 lengths=$5
  local common=(student.dtype=float32 "data.train_files=[$train]" "data.eval_files=[$train]"
                data.data_dir="$W/tfds" data.tokenizer="$T" $lengths train.heldout_every=0
                train.log_every=5)
  timed "${task}_sft" "$CLI" train --config configs/demo.yaml --workdir "$W/$task/sft" \
    teacher=null loss.kd_coef=0 loss.ce_coef=1 student.path="$T" optim.lr=1e-4 \
    optim.warmup_steps=1 train.steps=$SFT_STEPS "${common[@]}"
  timed "${task}_export" "$CLI" export --workdir "$W/$task/sft" --out "$W/$task/teacher"
  timed "${task}_csd" "$CLI" train --config configs/demo.yaml --workdir "$W/$task/csd" \
    teacher.path="$W/$task/teacher" student.path="$S" "loss.params=$params" \
    loss.normalize=sequence train.steps=$STEPS "${common[@]}"
  local eval=(--task "$task" --data "test=$test" --max-examples "$EXAMPLES")
  timed "${task}_eval_teacher" "$CLI" eval --model "$W/$task/teacher" "${eval[@]}" \
    --out "$W/$task/eval_teacher.json"
  timed "${task}_eval_init" "$CLI" eval --model "$S" "${eval[@]}" --out "$W/$task/eval_init.json"
  timed "${task}_eval_csd" "$CLI" eval --workdir "$W/$task/csd" "${eval[@]}" \
    --out "$W/$task/eval_csd.json"
}

# Chat pairs: teacher and student answer the same prompts (csd-jax generate, the official
# temperature 0.8), `csd-jax pairs` writes the official train.json, CSD (S,S) with the pair
# objective and the official gradual beta; judged by ROUGE-L against the teacher's greedy answers
# on held-out prompts, and written as an AlpacaEval answer file.
pairs() {
  local P=$W/pairs; mkdir -p "$P"
  "$PY" -c "
import json, sys
from csd_jax.demo.command import instruction_prompts
prompts, heldout = instruction_prompts()[:$PAIR_PROMPTS], instruction_prompts()[-$EXAMPLES:]
for name, rows in (('prompts', prompts), ('heldout_prompts', heldout)):
  with open(f'{sys.argv[1]}/{name}.jsonl', 'w') as f:
    f.writelines(json.dumps({'prompt': p}) + '\\n' for p in rows)
" "$P"
  local gen=(--max-new-tokens 64 --batch-size 32)
  timed pairs_generate_teacher "$CLI" generate --model "$T" --prompts "$P/prompts.jsonl" \
    --out "$P/teacher.jsonl" "${gen[@]}"
  timed pairs_generate_student "$CLI" generate --model "$S" --prompts "$P/prompts.jsonl" \
    --out "$P/student.jsonl" "${gen[@]}"
  "$CLI" pairs --teacher "$P/teacher.jsonl" --student "$P/student.jsonl" --out "$P/train.json"
  timed pairs_references "$CLI" generate --model "$T" --prompts "$P/heldout_prompts.jsonl" \
    --temperature 0 --out "$P/references.jsonl" "${gen[@]}"
  "$PY" -c "
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], 'w') as out:
  for line in f:
    r = json.loads(line)
    out.write(json.dumps({'instruction': r['prompt'], 'response': r['response']}) + '\\n')
" "$P/references.jsonl" "$P/heldout.jsonl"
  timed pairs_csd "$CLI" train --config configs/demo.yaml --workdir "$P/csd" data.source=pairs \
    "data.train_files=[$P/train.json]" "data.eval_files=[]" data.data_dir="$W/tfds" \
    data.tokenizer="$T" teacher.path="$T" student.path="$S" student.dtype=float32 \
    loss.normalize=sequence loss.pair_beta_end=1.5 train.steps=$STEPS train.heldout_every=0 \
    train.log_every=5 data.max_length=160 data.max_prompt_length=64
  local judge=(--data "heldout=$P/heldout.jsonl" --seeds 10,20,30 --max-new-tokens 64)
  timed pairs_eval_csd "$CLI" eval --workdir "$P/csd" "${judge[@]}" --out "$P/eval_csd.json"
  timed pairs_eval_init "$CLI" eval --model "$S" --template chat "${judge[@]}" \
    --out "$P/eval_init.json"
  "$CLI" report "Student init (4 of 30 layers)=$P/eval_init.json" "CSD pairs=$P/eval_csd.json" \
    --out "$P/table.md"
  timed pairs_alpaca_eval "$CLI" generate --workdir "$P/csd" --prompts "$P/heldout_prompts.jsonl" \
    --format alpaca_eval --out "$P/alpaca_eval_outputs.json" "${gen[@]}"
}

for part in $PARTS; do
  case $part in
    gsm8k) task gsm8k "$D/gsm_train.json" "{w1: teacher, w2: student, temperature: 1.0}" \
             "$D/gsm_test.jsonl" "data.max_length=176 data.max_prompt_length=96" ;;
    summ) task summarization "$D/summ_train.json" "{w1: 0.15, w2: 0.15, temperature: 1.0}" \
            "$D/summ_test.jsonl" "data.max_length=176 data.max_prompt_length=128 data.keep_prompt=start" ;;
    pairs) pairs ;;
    *) echo "unknown part $part: gsm8k, summ, pairs" >&2; exit 2 ;;
  esac
done
