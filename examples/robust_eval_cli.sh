#!/usr/bin/env bash
# Robust AUROC of an anomalib detector from the command line: train Padim on the embedded Fashion-MNIST data, then
# test it with the plugin's --callbacks shorthand, once with inline settings and once with the YAML in
# configs/callbacks/. The attack results (table, report.json/csv, plots) land next to anomalib's own test results, in
# <RESULTS>/Padim/FashionMNIST/<category>/latest/robust_eval/linf/.
#
# Settings are environment variables; the defaults take a few minutes on a laptop CPU. The test suite runs
#   IMAGE_SIZE=32 NUM_TRAIN=16 NUM_TEST=16 STEPS=2 QUERIES=20 bash examples/robust_eval_cli.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RESULTS="${RESULTS:-results/robust_eval_cli}"
IMAGE_SIZE="${IMAGE_SIZE:-64}"
NUM_TRAIN="${NUM_TRAIN:-100}"
NUM_TEST="${NUM_TEST:-60}"
STEPS="${STEPS:-10}"
QUERIES="${QUERIES:-200}"

# Random-init ResNet-18 (no download), resized to IMAGE_SIZE instead of anomalib's default 256 to stay CPU-sized.
MODEL=(
  --model Padim --model.backbone resnet18 --model.pre_trained false
  --model.pre_processor "{\"class_path\": \"anomalib.pre_processing.PreProcessor\", \"init_args\": {\"transform\":
    {\"class_path\": \"torchvision.transforms.v2.Resize\", \"init_args\": {\"size\": [${IMAGE_SIZE}, ${IMAGE_SIZE}]}}}}"
)
DATA=(
  --data "${REPO}/configs/data/fashion_mnist.yaml" --data.category trouser --data.image_size "${IMAGE_SIZE}"
  --data.num_train "${NUM_TRAIN}" --data.num_test "${NUM_TEST}"
)

anomalib train "${MODEL[@]}" "${DATA[@]}" --default_root_dir "${RESULTS}"
CKPT="${RESULTS}/Padim/FashionMNIST/trouser/latest/weights/lightning/model.ckpt"

# 1. Registered shorthand, settings on the command line: PGD and APGD at 1/255 and 2/255.
anomalib test "${MODEL[@]}" "${DATA[@]}" --default_root_dir "${RESULTS}" --ckpt_path "${CKPT}" \
  --callbacks robust_eval \
  --callbacks.init_args.attacks "[pgd, apgd]" \
  --callbacks.init_args.eps "[0.0039215686, 0.0078431373]" \
  --callbacks.init_args.steps "${STEPS}" \
  --callbacks.init_args.n_queries "${QUERIES}"

# 2. The YAML in configs/callbacks/, here switched to the L2 threat model of the paper (eps = 0.2).
anomalib test "${MODEL[@]}" "${DATA[@]}" --default_root_dir "${RESULTS}" --ckpt_path "${CKPT}" \
  --callbacks "${REPO}/configs/callbacks/robust_eval.yaml" \
  --callbacks.init_args.norm L2 \
  --callbacks.init_args.eps "[0.1, 0.2]" \
  --callbacks.init_args.steps "${STEPS}" \
  --callbacks.init_args.n_queries "${QUERIES}"
