#!/bin/bash
# CIFAR-10-size throughput and memory of the DxMI recipes on whatever device accelerate picks (a GPU when present).
# Needs no network: the UNet is google/ddpm-cifar10-32's architecture (35.7 M parameters) at random initialisation,
# and the data are 256 random 32x32 PNGs (the iteration's cost does not depend on either).
#   bash scripts/bench_cifar10_gpu.sh            # prints ms/iteration, peak GPU memory and sampling throughput
# for fp32, bf16 autocast and bf16 + torch.compile (train.compile; the first iterations include compilation, so
# the warm-up is longer there), the bf16 ones with and without channels-last weights (train.channels_last).
set -euo pipefail
images=$(mktemp -d)
python - "$images" <<'PY'
import sys
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
for i in range(256):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(f"{sys.argv[1]}/{i:04d}.png")
PY
unet='backbone.unet={sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=[128,256,256,256], down_block_types=["DownBlock2D","AttnDownBlock2D","DownBlock2D","DownBlock2D"], up_block_types=["UpBlock2D","UpBlock2D","AttnUpBlock2D","UpBlock2D"], norm_num_groups=32, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=false, freq_shift=1}'
for recipe in dxmi_cifar10 dxmi_cifar10_t4; do
  for precision in "no false 5 false" "bf16 false 5 false" "bf16 false 5 true" "bf16 true 20 false" "bf16 true 20 true"; do
    set -- $precision
    echo "== recipes/$recipe.toml, mixed_precision = $1, compile = $2, channels_last = $4"
    python scripts/bench_iteration.py "recipes/$recipe.toml" --iters 30 --warmup "$3" --sample 10000 \
      --set backbone.pretrained= --set data.kind=image_folder --set "data.path=$images" --set "$unet" \
      --set "train.mixed_precision=\"$1\"" --set "train.compile=$2" --set "train.channels_last=$4"
  done
done
rm -rf "$images"
