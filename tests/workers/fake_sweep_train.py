"""Stand-in for ``python -m spnet_dist.train`` in the sweep tests: no torch, instant.

Reads ``--config FILE`` and dotted overrides, appends its argv to ``$FAKE_TRAIN_LOG``, refuses an
existing run directory (like spnet-train), and writes one ``metrics.jsonl`` record whose values
are a pure function of the seed, ``loss.target_rate`` and ``fake.bonus`` (added to top-1).
``fail.seed=<k>`` makes seed k exit 1.
"""
import json
import os
import sys
from pathlib import Path

args = sys.argv[1:]
assert args[0] == "--config" and Path(args[1]).is_file(), args
overrides = dict(a.split("=", 1) for a in args[2:])
with open(os.environ["FAKE_TRAIN_LOG"], "a") as log:
    log.write(json.dumps(args[2:]) + "\n")
seed = int(overrides["run.seed"])
if overrides.get("fail.seed") == str(seed):
    print("planned failure", file=sys.stderr)
    sys.exit(1)
out = Path(overrides["run.out_dir"])
out.mkdir(parents=True)  # exists_ok=False: a sweep must never reuse a run directory
rate = float(overrides.get("loss.target_rate", 1.0))
# top1 in percent, like spnet-train's metrics.jsonl
bonus = float(overrides.get("fake.bonus", 0.0))  # a method's accuracy gain, for the comparison mode
record = {"epoch": 1, "top1": 50.0 + 10.0 * rate + seed + bonus, "mac_ratio": rate + 0.05,
          "exec_rate": rate, "gmacs": rate / 100, "static_gmacs": 0.01}
(out / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "top1": 0.1}) + "\n" + json.dumps(record) + "\n")
