#!/usr/bin/env bash
# AdvRAD from the anomalib command line, on the embedded Fashion-MNIST data: the commands a user types.
# Run from the repository root:   bash examples/adv_rad_cli.sh
# Smaller settings for a smoke run: EPOCHS=1 NUM_TRAIN=16 NUM_TEST=16 bash examples/adv_rad_cli.sh
set -euo pipefail
EPOCHS=${EPOCHS:-100}
NUM_TRAIN=${NUM_TRAIN:-200}
NUM_TEST=${NUM_TEST:-100}
RESULTS=${RESULTS:-results}
DATA=(--data configs/data/fashion_mnist.yaml --data.category trouser --data.image_size 32
      --data.num_train "$NUM_TRAIN" --data.num_test "$NUM_TEST" --data.train_batch_size 16)

# 1. Train the CPU preset (the plugin is loaded into anomalib automatically once installed).
anomalib train --config configs/model/adv_rad_cpu.yaml "${DATA[@]}" \
  --trainer.max_epochs "$EPOCHS" --trainer.check_val_every_n_epoch "$EPOCHS" --default_root_dir "$RESULTS"
CKPT=$(ls -t "$RESULTS"/AdvRAD/FashionMNIST/trouser/v*/weights/lightning/model.ckpt | head -n 1)

# 2. Test it: the architecture comes from the checkpoint, so `--model AdvRAD` is enough.
anomalib test --model AdvRAD "${DATA[@]}" --ckpt_path "$CKPT" --default_root_dir "$RESULTS"

# 3. Same weights, another reconstruction: arbitrary-shot with 4 denoising steps from k = 100 (Alg. 3).
anomalib test --model adv_rad --model.reconstruction arbitrary_shot --model.step_schedule "[100, 75, 50, 25]" \
  "${DATA[@]}" --ckpt_path "$CKPT" --default_root_dir "$RESULTS"

# 4. Predict on a folder of images (here: the test images the datamodule wrote to its cache).
IMAGES=$(dirname "$(find "${TMPDIR:-/tmp}/anomalib_robust/fashion_mnist" -name "*.png" -path "*/trouser/test/*" | head -n 1)")
anomalib predict --model AdvRAD --data "$IMAGES" --ckpt_path "$CKPT" --default_root_dir "$RESULTS"
