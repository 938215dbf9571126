#!/usr/bin/env bash
# The GPU path, run on a GPU, in one call that ends within BUDGET seconds (default 480):
#   1. stade from this working tree (no install: PYTHONPATH), and the CLI's typer and click from .gpu/wheels;
#   2. `pytest -m cuda`: CUDA against the CPU on tiny models (tests/test_cuda.py) and the other cuda tests;
#   3. bench/scale.py on the Llama-2-7B shape with --device cuda, the steps with targets first: the baselines, calibrate
#      128 × 2048 without and with --gram, prune from the stats with wanda and stade, eval, the prefill tokens/s of a
#      2:4 checkpoint's linears dense against torch.sparse.to_sparse_semi_structured, wanda + admm (plain, gradual),
#      sparsegpt, and last `prune --recipe best` (the gradual ADMM refit and the block-wise refinement).
#      What the budget leaves no time for is listed as skipped, and a step still running when it ends is sent
#      SIGTERM and listed as stopped, so the results always come back written.
# Results (scale.json, scale.md, pytest.txt, versions.txt) go to $OUT (default bench/results/gpu), named with the
# GPU and the software versions inside.
#
#   bench/gpu.sh prepare     here, before the call: puts SmolLM2's tokenizer and the Austen calibration text in
#                            .gpu/ (ignored by git; copy it to the GPU machine with the tree)
#   bench/gpu.sh             there (or here with DEVICE=cpu SHAPE=tiny NSAMPLES=2 SEQLEN=64 to try the script)
#
# STEPS (default: the order above), BUDGET, SHAPE (llama2-7b), NSAMPLES (128), SEQLEN (2048), WINDOWS (eval's
# windows; default NSAMPLES, so that eval and its baseline, the plain forward, run the same tokens), DEVICE (cuda),
# WORK (/tmp/stade-scale) change the run; PYTEST=0 skips step 2.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$PWD
if [[ ${1:-} == prepare ]]; then
    assets=${STADE_ASSETS:-$HOME/.cache/stade-assets}/smollm2-135m
    austen=${AUSTEN:-$here/../shared/data/austen}
    mkdir -p .gpu/tokenizer
    cp "$assets"/tokenizer.json "$assets"/tokenizer_config.json .gpu/tokenizer/
    cat "$austen"/emma.txt "$austen"/mansfieldpark.txt "$austen"/sensesensibility.txt > .gpu/calib.txt
    # the CLI's own pure-Python needs at the versions tested here (a GPU image may hold older ones, or none); the
    # rest (torch, transformers, accelerate, safetensors, rich, pyyaml) is what such an image has
    rm -rf .gpu/wheels
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels \
        "typer==$(python3 -c 'import importlib.metadata as m; print(m.version("typer"))')" \
        "click==$(python3 -c 'import importlib.metadata as m; print(m.version("click"))')"
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    du -sh .gpu
    exit 0
fi
OUT=${OUT:-$here/bench/results/gpu}
mkdir -p "$OUT"
if compgen -G ".gpu/wheels/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/site:$here
else
    export PYTHONPATH=$here
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
python3 - <<'PY' | tee "$OUT/versions.txt"
import platform, torch, transformers, accelerate, safetensors, typer, stade_cli
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
print(f"gpu: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); transformers {transformers.__version__}; "
      f"accelerate {accelerate.__version__}; safetensors {safetensors.__version__}; typer {typer.__version__}; "
      f"stade {stade_cli.__version__}; "
      f"python {platform.python_version()}")
PY
# the 7B shape's files need about 55 GB at once (model, Gram stats, one pruned output): say what the disk has
df -h "$(dirname "${WORK:-/tmp/stade-scale}")" | tee -a "$OUT/versions.txt"
if [[ ${PYTEST:-1} != 0 ]]; then
    # at most a third of the budget: the 7B steps are what only this machine can measure
    timeout -s INT $(( ${BUDGET:-480} / 3 )) python3 -m pytest -q -m cuda -p no:cacheprovider tests/ 2>&1 \
        | tail -40 | tee "$OUT/pytest.txt" || true
fi
STEPS=${STEPS:-roundtrip,forward,calibrate,calibrate-gram,prune:wanda,prune:stade,eval,sparse24,prune:wanda+admm,prune:wanda+admm-gradual,prune:sparsegpt,prune:recipe}
calib=${CALIB:-$here/.gpu/calib.txt}
tokenizer=${TOKENIZER:-$here/.gpu/tokenizer}
python3 bench/scale.py run --shape "${SHAPE:-llama2-7b}" --work "${WORK:-/tmp/stade-scale}" --calib "$calib" \
    --tokenizer "$tokenizer" --device "$DEVICE" --nsamples "${NSAMPLES:-128}" --seqlen "${SEQLEN:-2048}" \
    --max-windows "${WINDOWS:-${NSAMPLES:-128}}" --steps "$STEPS" --deadline $(( ${BUDGET:-480} - SECONDS )) --out "$OUT"
