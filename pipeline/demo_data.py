"""The demo's dataset: scikit-learn's handwritten digits (real scans, 8x8, 1,797 images) as an
ImageFolder of 32x32 RGB JPEGs, split into train and val, ready for ``python -m data_prep imagefolder``.

``python -m pipeline.demo_data OUT`` writes ``OUT/train/<digit>/<n>.jpg`` and ``OUT/val/<digit>/<n>.jpg``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(out: str | Path, val_fraction: float = 0.2, size: int = 32, seed: int = 0) -> dict[str, int]:
    """Write the ImageFolder trees; returns the number of images per split. Idempotent."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    is_val = rng.random(len(digits.images)) < val_fraction
    counts = {"train": 0, "val": 0}
    for n, (img, label, val) in enumerate(zip(digits.images, digits.target, is_val)):
        split = "val" if val else "train"
        path = Path(out) / split / str(label) / f"{n:04d}.jpg"
        counts[split] += 1
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8))
        gray.resize((size, size), Image.BICUBIC).convert("RGB").save(path, quality=95)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo_data", description=__doc__)
    parser.add_argument("out", help="output directory for the ImageFolder trees")
    args = parser.parse_args()
    counts = write_digits(args.out)
    print(f"digits ImageFolder in {args.out}: {counts['train']} train, {counts['val']} val images")


if __name__ == "__main__":
    main()
