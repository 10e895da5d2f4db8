#!/usr/bin/env bash
# The main job on one machine: set up, convert Fashion-MNIST to shards, pretrain fmnist-tiny as a 4-stage
# asynchronous pipeline (4 local processes), print the linear-probe / kNN table, write the pictures, then fine-tune
# the pretrained network and the same network from scratch on 10% of the labels (MAE's protocol, the preset's
# recipe) and print the two top-1 figures side by side.
# The demo's model is smaller than the preset's ViT-Tiny shapes (128 wide, 4 layers, one per block): at equal
# compute it probed as well as 192 x 12 in the ablation (benchmarks/README.md), and its eval is quicker, so the
# whole demo fits in about 10 minutes on 2 cores.
#   bash launch/demo.sh [extra --section.key=value overrides for bimdist train]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh demo
. .venv/bin/activate
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
RUN_DIR=${RUN_DIR:-runs/fmnist-tiny}
[ -f data/fashion-mnist/dataset.json ] || bimdist data prepare fashion-mnist --out data/fashion-mnist
bimdist train fmnist-tiny --pipeline.stages=4 --model.embed_dim=128 --model.num_heads=2 --model.depth=4 \
    --run.steps=300 --run.dir="$RUN_DIR" "$@"
bimdist eval "$RUN_DIR" --train-samples 5000 --test-samples 5000  # the probes: cheap monitors, on half the images
for init in pretrained scratch; do
  bimdist finetune "$RUN_DIR" --depth 4 --finetune.labels=0.1 --finetune.init=$init \
      --finetune.dir="$RUN_DIR/finetune-10pct-$init"
done
python -m bimdist.finetune.report "$RUN_DIR/finetune-10pct-pretrained" "$RUN_DIR/finetune-10pct-scratch"
echo "demo: reconstructions in $RUN_DIR/recon.png, losses in $RUN_DIR/loss.png, table in $RUN_DIR/eval.md," \
     "fine-tuning in $RUN_DIR/finetune-10pct-*/result.json"
