#!/usr/bin/env python3
"""Submit spnet-train to SLURM through submitit; see launch/README.md and spnet_dist/submit.py.

    python launch/submit.py --config configs/imagenet/spnet_r50.yaml --nodes 4 --gpus-per-node 8 \
        data.root=/data/imagenet run.out_dir=/checkpoint/$USER/r50 slurm.partition=gpu
    python launch/submit.py --config ... --dry-run      # print the sbatch script only
"""
from spnet_dist.submit import cli

if __name__ == "__main__":
    cli()
