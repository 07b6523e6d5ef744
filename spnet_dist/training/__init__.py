"""The trainer (being moved here from spnet_dist/train.py)."""
