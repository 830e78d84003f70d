#!/usr/bin/env bash
# The GPU measurements of one lent device call, in one script (the device's time is short):
#   1. the encoder's GPU path checked against the CPU (benchmarks/gpu_check.py);
#   2. encoding throughput of MiniLM-L6 (the bundled weights) and of a BERT-base-shaped random model, as the backend
#      runs them (fp32 weights under autocast) and with the weights cast to bf16, at three batch budgets;
#   3. the AG News replay with the encoder fine-tuned at 500 labels (issue 4's accuracy goal), on the GPU.
# The device machine reaches no registry and has its own torch, so the call carries (ignored folders, built by
# benchmarks/gpu_prepare.sh):
#   .whl/  wheels of requirements.txt's transformers, tokenizers and huggingface_hub pins;
#   .gpu/minilm/  the bundled MiniLM's files, its weights as fp16 safetensors (model16.safetensors) to fit the
#                 transfer's size limit; widened back to fp32 here;
#   .gpu/pool.csv.gz, .gpu/test.csv.gz  ../shared/data/ag_news (which does not travel).
# Logs go to $OUT; the last lines printed are the summary. TEXTS, BUDGET and SEEDS shrink it for a dry run on a CPU;
# each step stops by SESSION_SECONDS (460) from the start, so the summary prints within the call's 480 s.
set -u
cd "$(dirname "$0")/.."
WORK=$(mktemp -d)  # the wheels' install, the model, the data, per-run logs; removed on exit
trap 'rm -rf "$WORK"' EXIT
export WORK
TEXTS=${TEXTS:-100000} BUDGET=${BUDGET:-500} SEEDS=${SEEDS:-3}
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
END=$((SECONDS + ${SESSION_SECONDS:-460}))  # the device call's limit (480 s), less time for the summary
budget() {  # seconds for the next step: at most $1, and no later than END less 15 s for the summary (at least 1)
    local rest=$((END - SECONDS - 15))
    ((rest > $1)) && rest=$1
    ((rest < 1)) && rest=1
    echo $rest
}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $WORK/site .whl/*.whl
export PYTHONPATH=$WORK/site:$PWD
if ! python3 -c "import transformers.models.bert"; then
    echo "the carried wheels do not import here: the device's own transformers instead"
    export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit,driver_version --format=csv
python3 -c "import torch, transformers, tokenizers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())" || exit 1
nproc
python3 -c "import backend.bench, benchmarks.gpu_check, backend.evaluate" || exit 1  # what the steps below import

mkdir -p $WORK/minilm && cp -r .gpu/minilm/. $WORK/minilm/ && rm $WORK/minilm/model16.safetensors
python3 - <<'EOF' || exit 1
import csv, gzip, os
from safetensors.torch import load_file, save_file
weights = load_file(".gpu/minilm/model16.safetensors")
save_file({k: (v.float() if v.is_floating_point() else v) for k, v in weights.items()}, os.environ["WORK"] + "/minilm/model.safetensors", metadata={"format": "pt"})
texts = []
for name in ("pool", "test"):
    rows = list(csv.DictReader(gzip.open(f".gpu/{name}.csv.gz", "rt", encoding="utf-8", newline="")))
    with open(f"{os.environ['WORK']}/{name}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    texts += [row["text"] for row in rows]
with open(os.environ["WORK"] + "/texts.csv", "w", newline="", encoding="utf-8") as handle:  # 6 x the 17,600 AG News texts
    writer = csv.writer(handle)
    writer.writerow(["text"])
    writer.writerows([text] for _ in range(6) for text in texts)
print(f"{len(texts)} texts, x6 in texts.csv")
EOF

echo "== gpu_check"
timeout $(budget 120) python3 -m benchmarks.gpu_check --model $WORK/minilm --csv $WORK/test.csv 2>&1 | tee "$OUT/gpu_check.log" | grep -v Warning

mkdir -p $WORK/encode_logs
encode() {  # one log per run under $WORK, all of them appended to $OUT/encode.log (the call returns 8 files at most)
    local label=$1
    shift
    echo "== encode $label: $*" | tee -a "$OUT/encode.log"
    timeout $(budget 90) python3 -m backend.bench encode --csv $WORK/texts.csv --texts "$TEXTS" --repeat 3 "$@" >"$WORK/encode_logs/$label.log" 2>&1
    echo "rc=$?" >>"$WORK/encode_logs/$label.log"
    cat "$WORK/encode_logs/$label.log" >>"$OUT/encode.log"
    grep -E "^(model|texts=|batch_tokens|seconds|tokenize|peak|linear|end_to_end|model_only|texts_per|rc=)" "$WORK/encode_logs/$label.log"
}
encode minilm --model $WORK/minilm
encode minilm_bf16 --model $WORK/minilm --dtype bf16
encode minilm_16k --model $WORK/minilm --batch-tokens 16384
encode minilm_256k --model $WORK/minilm --batch-tokens 262144
encode bertbase --model random:bert-base --tokenizer $WORK/minilm
encode bertbase_bf16 --model random:bert-base --tokenizer $WORK/minilm --dtype bf16
encode bertbase_256k --model random:bert-base --tokenizer $WORK/minilm --batch-tokens 262144

echo "== evaluate: AG News, hybrid, fine-tuned at $BUDGET labels, $SEEDS seeds"
started=$(date +%s)
timeout $(budget 300) python3 -m backend.evaluate --pool $WORK/pool.csv --test $WORK/test.csv --strategy hybrid --budget "$BUDGET" \
    --batch-size 20 --seeds "$SEEDS" --finetune-at "$BUDGET" --model $WORK/minilm --cache-dir $WORK/cache \
    --out "$OUT/ag_news_finetune" >"$OUT/evaluate.log" 2>&1
echo "evaluate rc=$? seconds=$(($(date +%s) - started))"
tr '\r' '\n' <"$OUT/evaluate.log" | grep -E "fine-tuned|full-pool|labels saved|reaches|Error|error" | tail -20

echo "== summary"
grep -h "gpu_check=" "$OUT/gpu_check.log"
for log in $WORK/encode_logs/*.log; do
    echo "$(basename "$log" .log): $(grep -h -E '^(texts_per_second|model_only: share|end_to_end: share)' "$log" | tr '\n' ' ')"
done
