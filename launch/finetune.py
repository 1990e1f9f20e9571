#!/usr/bin/env python
"""Fine-tune a pre-trained model on a new dataset:

    deepspeed --num_gpus 2 launch/finetune.py --init runs/pretrain/model.safetensors \
              --config configs/finetune_demo.yaml [--run-dir DIR] [--max-steps N] [--resume] [key=value ...]

A head (with fitted references) is added for every configured dataset the model does not know;
``finetune.freeze_backbone`` and ``finetune.backbone_lr_ratio`` control what trains and how fast.
"""

import sys

from lamm_ds.engine.ds_engine import main

if __name__ == "__main__":
    sys.exit(main(default_config="configs/finetune_demo.yaml", default_run_dir="runs/finetune", finetune=True))
