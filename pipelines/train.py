"""Training pipeline entry point for ``accelerate launch``.

    accelerate launch --multi_gpu --num_processes 2 pipelines/train.py --steps 4000

Takes the same options as ``lcsc-ops train``; every process trains, the main process
logs the run and its checkpoints to MLflow.
"""
import sys

from lcsc_ops.cli import main

if __name__ == "__main__":
    sys.argv.insert(1, "train")
    main()
