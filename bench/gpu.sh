#!/usr/bin/env bash
# GPU checks and benchmarks in one go, results under $OUT (the device tool's output folder).
#   bash bench/gpu.sh checks     gpu-marked tests, the tiny demo on one GPU, the matmul/copy ceilings,
#                                ZeRO-2 weak scaling on 1, 2, 4 GPUs (8B shapes, 4 layers)
#   bash bench/gpu.sh seed N     the seed recipe on N GPUs (per-GPU work as on 8: micro-batch 4 x 4096,
#                                batch 480, accumulation 480 / (4 N)), random data, profile of step 3
#   bash bench/gpu.sh issue13    gpu-marked tests; one block's activations and time (bench/activations.py memory);
#                                the 1-GPU proxy (8B shapes, 4 layers, batch 16) by train.py, as if on the 80 GB card
#                                of an 8-rank seed (cap from bench/activations.py cap), and with a 40 GB cap; ours
#                                against transformers eager and torch.compile (bench/activations.py speed)
#   bash bench/gpu.sh overhead   the proxy's step time, this tree against an older one in .device/base
#   bash bench/gpu.sh issue14 DATA  gpu-marked tests; float8 against bf16: the cast, the matmuls, one block and the
#                                1-GPU proxy (bench/float8.py speed); convergence of a 61M Llama on the demo dataset
#                                whose JSON is DATA (bench/float8.py converge); the proxy by train.py, bf16 and float8
#   bash bench/gpu.sh issue18    gpu-marked tests; one block within and across documents, beside transformers'
#                                layer with the same mask (bench/documents.py block); the proxy by train.py on
#                                documents of a web corpus's lengths, batch.cross_document_attention true and false
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$OUT/card.txt"
seed="config/llama3_8b.yaml data.format=random training.validation.interval=null training.checkpoint.interval=null training.export.interval=null training.logs.interval=1"
case "$1" in
checks)
  timeout 180 python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
  (python prepare.py --demo --output /tmp/demo >/dev/null && python train.py config/tiny.yaml data.path=/tmp/demo/fast_llm_dataset.json run.experiment_dir=/tmp/tiny) 2>&1 | tail -8 | tee "$OUT/tiny.txt"
  python bench/ceilings.py | tee "$OUT/ceilings.txt"
  for n in 1 2 4; do
    torchrun --standalone --nproc_per_node=$n train.py $seed model.base_model.transformer.num_layers=4 \
      model.base_model.recompute_layers=0 batch.batch_size=$((16 * n)) training.train_iters=8 run.experiment_dir=/tmp/weak$n 2>&1 \
      | grep -E "^(step|starting|error)|Error" | tee "$OUT/weak$n.txt"
  done ;;
seed)
  n=$2
  LLAMA_PROFILE=$OUT/profile_seed.txt torchrun --standalone --nproc_per_node=$n train.py $seed training.train_iters=${3:-4} \
    run.experiment_dir=/tmp/seed 2>&1 | grep -vE "^\s*$" | tail -20 | tee "$OUT/seed$n.txt" ;;
issue13)
  timeout 200 python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
  timeout 100 python bench/activations.py memory 2>&1 | tee "$OUT/memory.md"
  proxy="$seed model.base_model.transformer.num_layers=4 batch.batch_size=16"
  keep="^(step|starting|error|filler)|Error|error:"
  timeout 90 python train.py $proxy model.base_model.recompute_layers=0 training.train_iters=7 run.experiment_dir=/tmp/p0 \
    2>&1 | grep -E "$keep" | tee "$OUT/proxy.txt"
  cap=$(python bench/activations.py cap 2>&1 | tee "$OUT/cap.md" | tail -1)
  for c in $cap 40e9; do
    timeout 90 python bench/as_80gb.py --capacity $c $proxy training.train_iters=7 run.experiment_dir=/tmp/p$c 2>&1 \
      | grep -E "$keep" | tee -a "$OUT/proxy.txt"
  done
  timeout 330 python bench/activations.py speed ${2:-4 8} 2>&1 | tee "$OUT/speed.md" ;;
overhead)
  # What the per-step checks cost (issue 10: non-finite loss/gradient agreed once a step; issue 12: timed log
  # lines): the same proxy step, this tree against the tree at $2 (git archive'd into .device/base and carried),
  # interleaved A B A B so that clocks and temperature drift hit both. 12 steps each, steps 4-12 kept.
  proxy="$seed model.base_model.transformer.num_layers=4 model.base_model.recompute_layers=0 batch.batch_size=16"
  for round in 1 2; do
    for tree in . .device/base; do
      (cd $tree && timeout 120 python train.py $proxy training.train_iters=12 run.experiment_dir=/tmp/o$round${tree//\//_} \
        2>&1 | grep -E "^step [0-9]+/" | sed "s|^|$tree round $round: |") | tee -a "$OUT/overhead.txt"
    done
  done ;;
issue14)
  timeout 140 python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
  timeout 140 python bench/float8.py speed 2>&1 | tee "$OUT/speed.md"
  timeout 140 python bench/float8.py converge "$2" 2>"$OUT/converge_log.txt" | tee "$OUT/converge.md"
  for f8 in false true; do
    timeout 70 python train.py $seed model.base_model.transformer.num_layers=4 batch.batch_size=16 \
      model.base_model.recompute_layers=0 model.distributed.float8_matmuls=$f8 training.train_iters=7 \
      run.experiment_dir=/tmp/p$f8 2>&1 | grep -E "^(step|starting|error)|Error|error:" | tee -a "$OUT/proxy.txt"
  done ;;
issue18)
  timeout 200 python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.txt"
  timeout 150 python bench/documents.py block 2>&1 | tee "$OUT/block.md"
  python bench/documents.py data /tmp/docs | tee "$OUT/docs.txt"
  for cda in true false; do
    timeout 100 python train.py $seed data.format=file data.path=/tmp/docs/d.json data.split=[1,0,0] \
      model.base_model.transformer.num_layers=4 batch.batch_size=16 model.base_model.recompute_layers=0 \
      batch.cross_document_attention=$cda training.train_iters=8 run.experiment_dir=/tmp/d$cda 2>&1 \
      | grep -E "^(step|starting|error)|Error|error:" | tee -a "$OUT/proxy.txt"
  done ;;
esac
