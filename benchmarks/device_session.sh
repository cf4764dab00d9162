#!/usr/bin/env bash
# The GPU measurements not run yet (benchmarks/README.md), in stages that each fit one 10-minute command
# on an H100/H200 machine whose image has torch, torchvision, h5py, click and rich but no FAISS, no lightly and
# no network.
#
#   bash benchmarks/device_session.sh prepare        # here, with network: fills the git-ignored .carry/
#   # then on the device, from the repository root, carrying .carry/ (about 45 MiB):
#   bash benchmarks/device_session.sh setup          # install and print versions only
#   bash benchmarks/device_session.sh speed          # train_throughput.py (4 methods, R18, batch 512)
#   bash benchmarks/device_session.sh train [EPOCHS] # CIFAR-10 ISD R18 (default 60 epochs) with k-NN
#   bash benchmarks/device_session.sh profile        # profile_step.py (ISD R18) + lightly_side_by_side.py
#   bash benchmarks/device_session.sh tests          # the test suite with CUDA present
#   bash benchmarks/device_session.sh search         # ann_auto.py + mine_scale.py at 1M; export, k-NN
#   bash benchmarks/device_session.sh dino           # dino_vit_step.py: AdaSim-DINO ViT-S/16, bf16, compile
#
# In that order of priority: 30 minutes on the device hold about four of these stages.
# Each device stage installs what it needs first, stops its own work before the 10-minute limit and
# copies its JSON results and logs to $OUT (at most 8 files come back).
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?usage: device_session.sh prepare|setup|speed|train [EPOCHS]|profile|tests|search|dino}
out=${OUT:-/tmp/isd-device-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

prepare() {
  mkdir -p .carry # git-ignored
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .carry "faiss-cpu>=1.7.4" "lightly==1.6.0"
  cp -f ../shared/data/cifar10-jpeg.tar.gz .carry/
  # the trained small CNN whose features ann_auto.py / mine_scale.py index (random-init without it)
  if [ -f runs/cifar-small/encoder.pt ]; then cp -f runs/cifar-small/encoder.pt .carry/; fi
  du -sh .carry
}

setup() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/*.whl
  export PYTHONPATH="/tmp/site:$PWD" # the project from the source tree (its CLIs as python3 -m)
  mkdir -p ../shared/data runs/cifar-small
  [ -f ../shared/data/cifar10-jpeg.tar.gz ] || cp .carry/cifar10-jpeg.tar.gz ../shared/data/
  if [ -f .carry/encoder.pt ]; then cp -f .carry/encoder.pt runs/cifar-small/; fi
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from _harness import cifar_root; cifar_root()"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  fi
  python3 -c "import faiss, torch; from isdretrieve.util.torchvision import import_torchvision as tv
print('torch', torch.__version__, 'torchvision', tv().__version__, 'faiss', faiss.__version__,
      'cuda', torch.cuda.is_available())"
}

# run SECONDS LOG COMMAND...: stop COMMAND after SECONDS (SIGTERM, then SIGKILL 20 s later), log to $out
run() {
  local seconds=$1 log=$2
  shift 2
  timeout -s TERM -k 20 "$seconds" "$@" 2>&1 | tee -a "$out/$log" || echo "exit $? from: $*" | tee -a "$out/$log"
}

results() { for f in "$@"; do [ -f "benchmarks/results/$f" ] && cp "benchmarks/results/$f" "$out/"; done; true; }

case $stage in
  prepare) prepare ;;
  setup) setup ;;
  tests)
    setup
    # the GPU tests, then the rest as CI runs it (CPU only: those tests pin bit-exact CPU behaviour)
    run 260 tests.log python3 -m pytest -q -p no:cacheprovider -m gpu
    run 290 tests.log env CUDA_VISIBLE_DEVICES= python3 -m pytest -q -p no:cacheprovider -m "not gpu"
    ;;
  dino)
    setup
    run 300 dino.log python3 benchmarks/dino_vit_step.py --batch 256 --steps 10
    results dino_vit_step_cuda.json
    ;;
  speed)
    setup
    run 540 speed.log python3 benchmarks/train_throughput.py
    results train_throughput_cuda.json
    ;;
  profile)
    setup
    run 150 profile.log python3 benchmarks/profile_step.py --trace "$out/profile_isd_r18.json.gz"
    run 360 profile.log python3 benchmarks/lightly_side_by_side.py --compile
    results profile_step_cuda.json lightly_side_by_side_compiled_cuda.json
    ;;
  search)
    setup
    run 240 search.log python3 benchmarks/ann_auto.py --rows 1000000 --threads 16
    run 120 search.log python3 benchmarks/mine_scale.py --rows 1000000 --dense-max 0 \
      --source indices/cifar10-views-1000k/bank.h5
    run 60 search.log python3 benchmarks/export_overhead.py --device cuda --arch resnet18 --threads 16
    run 90 search.log python3 benchmarks/knn_overhead.py
    results ann_auto_1000000_cuda.json mine_scale_cuda.json export_overhead_cuda.json knn_overhead_cuda.json
    ;;
  train)
    setup
    epochs=${2:-60}
    run 540 train.log python3 -m isdretrieve.cli.train training/cifar10-isd.yaml --out runs/cifar10-isd-r18 --quiet \
      --set "data.train=folder:.data/cifar10-jpeg,split=train" --set "optim.epochs=$epochs" \
      --set "optim.warmup_epochs=$(((epochs + 19) / 20))" --set "monitor.every=$(((epochs + 9) / 10))"
    cp runs/cifar10-isd-r18/metrics.jsonl runs/cifar10-isd-r18/recipe.yaml "$out/" || true
    ;;
  *)
    echo "unknown stage '$stage' (prepare, setup, speed, train, profile, tests, search)" >&2
    exit 2
    ;;
esac
