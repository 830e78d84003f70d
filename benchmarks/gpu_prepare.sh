#!/usr/bin/env bash
# Builds, on this machine, the ignored folders that benchmarks/gpu_session.sh needs on a lent GPU machine, which
# reaches no registry and not ../shared (the device call carries at most 64 MiB):
#   .whl/          wheels of the transformers and tokenizers pins in requirements.txt, and of the huggingface_hub
#                  installed beside them (pure Python, or abi3: any CPython 3.9+ on x86_64 Linux);
#   .gpu/minilm/   the bundled MiniLM's files, its weights as fp16 (model16.safetensors, 45 MB instead of 90);
#   .gpu/{pool,test}.csv.gz   ../shared/data/ag_news.
# Then, with a device lent: run with command `bash benchmarks/gpu_session.sh 2>&1 | tee $OUT/session.log`,
# carry [".whl", ".gpu"], timeout_s 480. A dry run on this CPU: `PATH=$PWD/.venv/bin:$PATH TEXTS=500 BUDGET=40
# SEEDS=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
pin() { grep -E "^$1==" requirements.txt; }
hub="huggingface_hub==$($python -c 'import huggingface_hub; print(huggingface_hub.__version__)')"
rm -rf .whl .gpu
$python -m pip download -q --no-deps --only-binary=:all: -d .whl "$(pin transformers)" "$(pin tokenizers)" "$hub"

mkdir -p .gpu/minilm
bundled=$($python -c 'from backend.ml.model_files import DEFAULT_MODEL_NAME, resolve_model_path; print(resolve_model_path(DEFAULT_MODEL_NAME))')
cp -r "$bundled"/. .gpu/minilm/
rm -f .gpu/minilm/model.safetensors
$python - "$bundled/model.safetensors" <<'EOF'
import sys

from safetensors.torch import load_file, save_file

weights = load_file(sys.argv[1])
half = {name: (tensor.half() if tensor.is_floating_point() else tensor) for name, tensor in weights.items()}
save_file(half, ".gpu/minilm/model16.safetensors", metadata={"format": "pt"})
EOF
for name in pool test; do
    gzip -c "../shared/data/ag_news/$name.csv" >".gpu/$name.csv.gz"
done
du -sh .whl .gpu
echo "with the repository's tracked files, the call carries $(($(git ls-files -z | xargs -0 cat | wc -c) / 1048576 + $(du -sm .whl .gpu | awk '{s += $1} END {print s}'))) MiB of 64"
