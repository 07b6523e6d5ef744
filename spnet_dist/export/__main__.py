"""``python -m spnet_dist.export`` = ``spnet-export``."""
from .writer import cli

cli()
