#!/usr/bin/env bash
# The whole nanoadapt pipeline, end to end, in miniature (3-4 minutes on 2 CPU cores).
#
#   1. an "English-oriented" base: an English tokenizer and a tiny Mistral-style model pretrained
#      from random init on English text (the stand-in for Mistral-7B)
#   2. a Russian tokenizer                       train_tokenizer.py
#   3. the vocabulary surgery                    resize_vocab.py --mode extend
#   4. continued pretraining on Russian + English replay, KL to the untouched base    pretrain.py
#   5. instruction tuning on Russian chat data   sft.py
#   6. a larger teacher built the same way, its top-k stored once, distilled into the student   distill.py
#   7. every stage side by side                  evaluate.py
#
# DATA=../shared/data ./demo.sh runs it on the real corpora with larger settings.
# Outputs go to $OUT (default runs/demo); each stage's output is an HF model directory.
set -euo pipefail
# OUT, DATA and a PY path given relative are relative to where the command was typed (PY=python3, a
# command name, stays as it is); the defaults, to this folder
for var in OUT DATA PY; do
  value=${!var:-/}
  if [[ $value != /* && ( $var != PY || $value == */* ) ]]; then printf -v "$var" '%s' "$PWD/$value"; fi
done
cd "$(dirname "$0")"
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
DATA=${DATA:-data}
[ -d "$DATA" ] || { echo "demo.sh: DATA=$DATA is not a folder" >&2; exit 2; }
mkdir -p "$OUT"

if [ "$(cd "$DATA" && pwd)" = "$PWD/data" ]; then     # the embedded samples written for this project
  EN=data/en.txt; RU=data/ru.txt; EN_EVAL=data/en_heldout.txt; RU_EVAL=data/ru_heldout.txt
  CHAT="data/chat_ru.jsonl data/chat_ru_alpaca.jsonl"; MC="data/mc_ru.jsonl data/mc_en.jsonl"
  PROMPTS=data/prompts_ru.txt
  BASE_VOCAB=1000; RU_VOCAB=3000; HIDDEN=128; LAYERS=4; TEACHER_HIDDEN=192; TEACHER_LAYERS=6
  SEQ=128; BASE_STEPS=400; RU_STEPS=250; SFT_STEPS=60; TEACHER_STEPS=300; MAX_CHARS=8000; EVAL_LEN=256
else                                        # real corpora, e.g. DATA=../shared/data
  EN_EVAL="$DATA/en/pg1661_doyle_adventures_of_sherlock_holmes.txt"; RU_EVAL="$DATA/ru/Turgenev_Rudin.txt"
  # the training sets: every book but the two held out for evaluation (links, so a source is one folder)
  EN="$OUT/train_data/en"; RU="$OUT/train_data/ru"
  rm -rf "$OUT/train_data"; mkdir -p "$EN" "$RU"
  for f in "$DATA"/en/*.txt; do [ "$f" = "$EN_EVAL" ] || ln -s "$(cd "$(dirname "$f")" && pwd)/${f##*/}" "$EN/"; done
  for f in "$DATA"/ru/*.txt; do [ "$f" = "$RU_EVAL" ] || ln -s "$(cd "$(dirname "$f")" && pwd)/${f##*/}" "$RU/"; done
  CHAT="$DATA/chat/ru_seed_tasks.messages.jsonl $DATA/chat/ru_saiga_tasks.alpaca.jsonl"
  MC="$DATA/bench/ru_mmlu.jsonl $DATA/bench/ru_openbookqa.jsonl $DATA/bench/ru_parus.jsonl $DATA/bench/en_mmlu.jsonl"
  PROMPTS=data/prompts_ru.txt
  BASE_VOCAB=8000; RU_VOCAB=16000; HIDDEN=192; LAYERS=4; TEACHER_HIDDEN=256; TEACHER_LAYERS=6
  SEQ=256; BASE_STEPS=400; RU_STEPS=300; SFT_STEPS=100; TEACHER_STEPS=300; MAX_CHARS=20000
  EVAL_LEN=1024             # byte-level Russian under the English base makes ruMMLU choices long
fi

step() { echo; echo "=== $*"; }
config() {  # config.json of a tiny Mistral-style model: hidden, layers, vocab
  cat <<EOF
{"model_type": "mistral", "architectures": ["MistralForCausalLM"], "vocab_size": $3,
 "hidden_size": $1, "intermediate_size": $(($1 * 3)), "num_hidden_layers": $2,
 "num_attention_heads": $(($1 / 32)), "num_key_value_heads": $(($1 / 64)), "head_dim": 32,
 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
 "sliding_window": null, "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2}
EOF
}
# tiny models, one CPU: small batches, no intermediate checkpoints (the papers' batch sizes are the defaults)
SMALL_BATCH="--seq-len $SEQ --batch-size 8 --grad-accum 1 --warmup-steps 10 --save-every 0 --log-every 50"

step "1. the English-oriented base: tokenizer, then a model pretrained from scratch on English"
$PY train_tokenizer.py --input $EN --vocab-size $BASE_VOCAB --out $OUT/en_tokenizer
config $HIDDEN $LAYERS $BASE_VOCAB > $OUT/base_config.json
$PY pretrain.py --init-config $OUT/base_config.json --tokenizer $OUT/en_tokenizer --data $EN \
  --kl-weight 0 --lr 3e-3 --beta1 0.9 --max-steps $BASE_STEPS --eval-every 0 $SMALL_BATCH --out $OUT/base

step "2. a Russian tokenizer (compared with the base's)"
$PY train_tokenizer.py --input $RU $EN:0.3 --vocab-size $RU_VOCAB --out $OUT/ru_tokenizer \
  --eval-text $RU_EVAL $EN_EVAL --compare $OUT/base

step "3. vocabulary surgery: extend the base vocabulary, new rows = mean of their old pieces"
$PY resize_vocab.py --model $OUT/base --tokenizer $OUT/ru_tokenizer --mode extend --out $OUT/adapted

step "4. continued pretraining on Russian with English replay, KL to the untouched base"
$PY pretrain.py --model $OUT/adapted --kl-ref $OUT/base --kl-weight 1 --data $RU:0.8 $EN:0.2 \
  --lr 1e-3 --max-steps $RU_STEPS --eval-every 0 $SMALL_BATCH --out $OUT/pretrained

step "5. instruction tuning on Russian chat data"
$PY sft.py --model $OUT/pretrained --data $CHAT --chat-template chatml --lr 1e-3 --warmup-steps 5 \
  --seq-len 256 --batch-size 4 --grad-accum 1 --max-steps $SFT_STEPS --save-every 0 --eval-every 0 \
  --log-every 10 --samples 1 --sample-tokens 32 --out $OUT/sft

step "6. a larger teacher (same tokenizer), its top-k stored once, distilled into the student"
TEACHER_VOCAB=$($PY -c "import json; print(json.load(open('$OUT/adapted/config.json'))['vocab_size'])")
config $TEACHER_HIDDEN $TEACHER_LAYERS $TEACHER_VOCAB > $OUT/teacher_config.json
$PY pretrain.py --init-config $OUT/teacher_config.json --tokenizer $OUT/adapted --data $RU:0.8 $EN:0.2 \
  --kl-weight 0 --lr 3e-3 --beta1 0.9 --max-steps $TEACHER_STEPS --eval-every 0 $SMALL_BATCH --out $OUT/teacher_base
$PY sft.py --model $OUT/teacher_base --data $CHAT --chat-template chatml --lr 1e-3 --warmup-steps 5 \
  --seq-len 256 --batch-size 4 --grad-accum 1 --max-steps $SFT_STEPS --save-every 0 --eval-every 0 \
  --log-every 10 --samples 0 --out $OUT/teacher
$PY distill.py dump --teacher $OUT/teacher --data $CHAT --chat-template chatml --top-k 32 --max-len 256 \
  --out $OUT/topk_store
$PY distill.py train --student $OUT/pretrained --store $OUT/topk_store --lr 1e-3 --warmup-steps 5 \
  --seq-len 256 --batch-size 4 --grad-accum 1 --max-steps $SFT_STEPS --save-every 0 --out $OUT/distilled

step "7. every stage side by side"
$PY evaluate.py --models $OUT/base $OUT/adapted $OUT/pretrained $OUT/sft $OUT/distilled $OUT/teacher \
  --text $RU_EVAL $EN_EVAL --mc $MC --prompts $PROMPTS --max-chars $MAX_CHARS --max-prompts 4 \
  --max-new-tokens 48 --max-len $EVAL_LEN --stride $((EVAL_LEN / 2)) --out $OUT/report.json | tee $OUT/report.md
