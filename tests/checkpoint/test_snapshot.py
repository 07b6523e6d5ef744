"""spnet_dist.checkpoint.snapshot without an engine: RNG streams as JSON."""
import json
import random

import numpy as np
import torch

from spnet_dist import checkpoint as C


def test_rng_round_trips_through_json():
    state = json.loads(json.dumps(C.capture_rng(torch.device("cpu"))))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    C.restore_rng(state, torch.device("cpu"))
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert expected[:2] == again[:2] and torch.equal(expected[2], again[2])
