#!/usr/bin/env python
"""Pre-train LaMM-S: ``deepspeed launch/pretrain.py`` (demo data by default).

    deepspeed --num_gpus 2 launch/pretrain.py [--config configs/X.yaml] [--run-dir DIR]
              [--max-steps N] [--resume] [key=value ...]

Also runs under ``torchrun`` and plain ``python`` (one process).
"""

import sys

from lamm_ds.engine.ds_engine import main

if __name__ == "__main__":
    sys.exit(main(default_config="configs/demo.yaml", default_run_dir="runs/pretrain"))
