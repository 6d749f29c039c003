"""
Colour fidelity of generated images, not a test: pytest collects only test_*.py. Are the samples in the data's
colours (skin tones, yellow smileys, white backgrounds), whatever their shapes?

    python sample.py runs/emoji/ckpt.pt --num 96 --steps 50 --out runs/emoji/generated
    python tests/colour.py runs/emoji/generated                      # against data/emoji
    python tests/colour.py runs/a/generated runs/b/generated         # a row per folder

Each image becomes its colour histogram, blind to shape. First the image is averaged over cells of 4 x 4 pixels
(32 x 32 -> 8 x 8): a model's samples are softer than the data, and at full resolution the in-between colours of
soft edges alone lose precision (the held-out emoji blurred by a 3 x 3 box fall from 0.96 to 0.75), which is
sharpness, not colour; averaged over cells, sharp and soft edges give the same mixtures. Then the histogram: the
fraction of the cells near each of 4 x 4 x 4 RGB levels (0, 85, 170, 255), soft-binned (each cell shares its
weight between the 8 levels around it, so that a colour moves the histogram smoothly), square-rooted, so that
Euclidean distance is the Hellinger distance between histograms and a colour covering few cells (a green face on
a white background) still counts.
In that space, against the training images (Kynkaenniemi et al. 2019, "Improved precision and recall"; Naeem et
al. 2020, "Reliable fidelity and diversity metrics"), with a ball around each image reaching its k-th nearest
neighbour:
    precision   the fraction of samples inside some training image's ball: samples in the data's colours
    recall      the fraction of training images inside some sample's ball. A stray sample far from everything
                has a huge ball that takes in most of the data, so off-colour samples inflate it
    coverage    the fraction of training images whose own ball holds a sample: recall without that flaw
The held-out images (data/emoji_test), scored as if they were samples, give what a perfect model reaches. All
three depend on the number of samples scored, so every folder is scored in random subsets of the held-out set's
size (28), and the mean and standard deviation over the subsets are printed: the deviation is also the noise of
the held-out figure itself, which is one set of 28.
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for its modules

import numpy as np
import torch
from PIL import Image

import util


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=util.HelpFormatter)
    p.add_argument("samples", nargs="+", help="folders of generated PNGs (all *.png in each), e.g. sample.py's --out")
    p.add_argument("--data_dir", default="data/emoji", help="the training images: the colours to match")
    p.add_argument("--heldout", default="data/emoji_test",
                   help="images of the same kind kept out of training: the reference figure and the subset size")
    p.add_argument("--cell", type=int, default=4, help="average each image over cells of cell x cell pixels first")
    p.add_argument("--levels", type=int, default=4, help="histogram levels per RGB channel (levels^3 bins)")
    p.add_argument("--k", type=int, default=3, help="the k-th nearest neighbour sets each image's ball (paper: 3)")
    p.add_argument("--subsets", type=int, default=200, help="random subsets of each folder to average over")
    p.add_argument("--seed", type=int, default=0, help="seeds the choice of subsets")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------------------
# The colour features


def load_images(folder):
    """All *.png in folder -> (N, H, W, 3) float64 in [0, 1]."""
    paths = sorted(Path(folder).glob("*.png"))  # a fixed order, so that --seed picks the same subsets
    if not paths:
        raise SystemExit(f"error: no PNGs in {folder!r}")
    images = [np.asarray(util.to_rgb(Image.open(path)), dtype=np.float64) / 255 for path in paths]
    if len({image.shape for image in images}) > 1:
        raise SystemExit(f"error: the PNGs of {folder!r} differ in size")
    return torch.from_numpy(np.stack(images))


def cell_means(images, cell):
    """(N, H, W, 3) -> (N, H / cell, W / cell, 3): the mean colour of each cell x cell square."""
    cells = torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2), cell)  # (N, 3, H / cell, W / cell)
    return cells.permute(0, 2, 3, 1)


def colour_histogram(images, levels=4):
    """(N, H, W, 3) in [0, 1] -> (N, levels^3): the square root of each image's soft RGB histogram. A pixel at
    position p (in level units) on a channel gives 1 - frac(p) to the level below and frac(p) to the one above, on
    each channel, so a pixel's weight (here a cell's) goes to the 8 corners of the cube of levels around it. The
    histogram sums to 1, so the features have unit length, and shuffling the pixels leaves them as they are."""
    n = images.shape[0]
    position = images.reshape(n, -1, 3) * (levels - 1)  # (N, pixels, 3) in level units
    low = position.floor().long().clamp(0, levels - 2)  # the level below, so that low + 1 exists at the top
    frac = position - low  # (N, pixels, 3) in [0, 1]
    histogram = torch.zeros(n, levels ** 3, dtype=images.dtype)
    for corner in range(8):  # (dr, dg, db) in {0, 1}^3
        offset = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1])
        weight = torch.where(offset.bool(), frac, 1 - frac).prod(dim=-1)  # (N, pixels)
        level = low + offset  # (N, pixels, 3)
        index = (level[..., 0] * levels + level[..., 1]) * levels + level[..., 2]
        histogram.scatter_add_(1, index, weight)
    return (histogram / position.shape[1]).sqrt()


def colour_features(images, cell=4, levels=4):
    """(N, H, W, 3) in [0, 1] -> (N, levels^3): the histogram of the cells' mean colours."""
    return colour_histogram(cell_means(images, cell), levels)


# ----------------------------------------------------------------------------------------------------------
# k-nearest-neighbour manifolds


def knn_radii(features, k):
    """(N, D) -> (N,): each point's distance to its k-th nearest other point, the radius of its ball."""
    if not 0 < k < len(features):
        raise ValueError(f"k = {k} needs at least k + 1 = {k + 1} points, got {len(features)}")
    distances = torch.cdist(features, features)  # (N, N), 0 on the diagonal: the point itself is neighbour 0
    return distances.sort(dim=1).values[:, k]


def inside_balls(points, centres, radii):
    """(P, D), (C, D), (C,) -> (P, C) bool: point p lies in the ball of centre c (its boundary included)."""
    return torch.cdist(points, centres) <= radii[None, :]


def precision(real, real_radii, fake):
    """The fraction of fake points inside the ball of some real point."""
    return inside_balls(fake, real, real_radii).any(dim=1).double().mean().item()


def recall(real, fake, fake_radii):
    """The fraction of real points inside the ball of some fake point."""
    return inside_balls(real, fake, fake_radii).any(dim=1).double().mean().item()


def coverage(real, real_radii, fake):
    """The fraction of real points whose own ball holds some fake point."""
    return inside_balls(fake, real, real_radii).any(dim=0).double().mean().item()


def scores(real, fake, k, subset_size, subsets, generator):
    """{name: (mean, standard deviation)} of precision, recall and coverage of fake against real, over random
    subsets of subset_size fake points (one, all of them, when there are no more than that)."""
    if len(fake) <= subset_size:
        subsets, subset_size = 1, len(fake)
    real_radii = knn_radii(real, k)
    values = {"precision": [], "recall": [], "coverage": []}
    for _ in range(subsets):
        chosen = fake[torch.randperm(len(fake), generator=generator)[:subset_size]]
        values["precision"].append(precision(real, real_radii, chosen))
        values["recall"].append(recall(real, chosen, knn_radii(chosen, k)))
        values["coverage"].append(coverage(real, real_radii, chosen))
    return {name: (float(np.mean(v)), float(np.std(v))) for name, v in values.items()}


# ----------------------------------------------------------------------------------------------------------


def main():
    args = parse_args()
    start = time.perf_counter()
    real = colour_features(load_images(args.data_dir), args.cell, args.levels)
    heldout = colour_features(load_images(args.heldout), args.cell, args.levels)
    subset_size = len(heldout)
    print(f"colour fidelity against the {len(real)} images of {args.data_dir}: soft RGB histograms of "
          f"{args.cell}x{args.cell}-pixel cells, {args.levels} levels a channel, Hellinger distance, k = {args.k}; "
          f"mean ± std over {args.subsets} subsets of {subset_size} images")
    generator = torch.Generator()  # reseeded for each folder: its figures do not depend on the folders before it
    rows = [(f"{args.heldout} (held out)", len(heldout), scores(real, heldout, args.k, subset_size, 1, generator))]
    for folder in args.samples:
        fake = colour_features(load_images(folder), args.cell, args.levels)
        if len(fake) < subset_size:
            print(f"warning: {folder} has {len(fake)} images, fewer than {subset_size}: its recall and coverage "
                  f"are not comparable", file=sys.stderr)
        generator.manual_seed(args.seed)
        rows.append((folder, len(fake), scores(real, fake, args.k, subset_size, args.subsets, generator)))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'folder':<{width}}  images  precision    recall       coverage")
    for name, count, result in rows:
        cells = "  ".join(f"{mean:.3f} ± {std:.3f}" if std else f"{mean:.3f}        " for mean, std in result.values())
        print(f"{name:<{width}}  {count:6d}  {cells}")
    print(f"measured in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
