"""Write a synthetic ImageNet-layout folder of real JPEGs (tests, loader benchmarks).

    python tools/make_fake_imagenet.py /tmp/fake --classes 10 --per-class 200   # 2,000 train JPEGs
"""
from __future__ import annotations

import argparse

from spnet_dist.data.fake import make_fake_imagenet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="dataset root to create (train/ and val/ go inside)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes")
    parser.add_argument("--per-class", type=int, default=20, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=None, help="validation images per class "
                        "(default per-class // 5)")
    parser.add_argument("--seed", type=int, default=0, help="content seed")
    parser.add_argument("--min-side", type=int, default=400, help="smallest longer side, px")
    parser.add_argument("--max-side", type=int, default=600, help="largest longer side, px")
    args = parser.parse_args()
    root = make_fake_imagenet(args.out, args.classes, args.per_class, args.val_per_class, args.seed,
                              (args.min_side, args.max_side))
    print(f"wrote {root}: {args.classes} classes x {args.per_class} train images")


if __name__ == "__main__":
    main()
