"""``python -m spnet_dist.train``: the module torchrun, ``deepspeed --module``, ``accelerate launch -m``
and SLURM batch scripts start on every rank; the trainer is :mod:`spnet_dist.training`."""
from spnet_dist.training.trainer import cli

if __name__ == "__main__":
    cli()
