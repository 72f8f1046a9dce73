"""Write a VOC-layout dataset of a second generator (:mod:`ccnn.data.voc_like`).

Other shapes, textures and backgrounds than the built-in synthetic default, with VOC's object
sizes (background about 68%), or small objects with ``--small-objects`` (background about 89%):
data no preset was tuned on, read by ``ccnn train --dataset voc --data-root DIR`` (or
``--preset voc``).  Deterministic in ``--seed``.  Prints each split's statistics.

    python scripts/make_voc_like.py --out data/voclike --seed 1 --size 1000 [--small-objects]
"""

from __future__ import annotations

import argparse
import sys

from ccnn.data.voc_like import write_voc_like


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write (the VOC2012 folder)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--size", type=int, required=True, help="training images")
    parser.add_argument("--val-size", type=int, help="validation images (default size // 5)")
    parser.add_argument("--test-size", type=int, help="test images (default size // 5)")
    parser.add_argument("--image-size", type=int, default=64, help="image side (default 64)")
    parser.add_argument("--small-objects", action="store_true",
                        help="objects covering 3-25%% of the image (background about 89%%)")
    args = parser.parse_args(argv)
    try:
        meta = write_voc_like(args.out, size=args.size, seed=args.seed, val_size=args.val_size,
                              test_size=args.test_size, image_size=args.image_size,
                              small_objects=args.small_objects)
    except ValueError as err:
        print(f"make_voc_like: error: {err}", file=sys.stderr)
        return 2
    for split, s in meta["statistics"].items():
        print(f"{split:<5} {s['images']:>5} images, background {s['background_mean']:.3f} "
              f"(min {s['background_min']:.3f}, max {s['background_max']:.3f}), "
              f"{s['classes_per_image']:.2f} classes per image")
    print(f"written to {args.out}: ccnn train --preset voc --model small --data-root {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
