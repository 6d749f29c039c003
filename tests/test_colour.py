"""tests/colour.py, the colour-fidelity measure: its k-NN math on a few 2-D points worked out by hand, its colour
histogram on images whose histogram is known, and what it says of the bundled emoji."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# loaded from its file: "colour" alone could be an installed package (colour-science)
_spec = importlib.util.spec_from_file_location("colour_measure", ROOT / "tests" / "colour.py")
colour = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(colour)

# Four real points on a line, 1 apart. Their 2nd nearest neighbours: (2, 0) for (0, 0), at 2; one step either
# side for (1, 0) and (2, 0), at 1; (1, 0) for (3, 0), at 2.
REAL = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]], dtype=torch.float64)
REAL_RADII_K2 = [2.0, 1.0, 1.0, 2.0]


def test_knn_radii_by_hand():
    assert colour.knn_radii(REAL, 1).tolist() == [1.0, 1.0, 1.0, 1.0]
    assert colour.knn_radii(REAL, 2).tolist() == REAL_RADII_K2
    assert colour.knn_radii(REAL, 3).tolist() == [3.0, 2.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="at least"):
        colour.knn_radii(REAL, 4)  # a 4th neighbour among 4 points does not exist


def test_precision_recall_coverage_by_hand():
    radii = colour.knn_radii(REAL, 2)
    fake = torch.tensor([[0.0, 1.0], [0.0, 3.0]], dtype=torch.float64)  # 2 apart: k = 1 radii of 2
    # (0, 1) is 1 from (0, 0), inside its radius 2; (0, 3) is 3 from (0, 0) and sqrt(10) from the others: outside
    assert colour.precision(REAL, radii, fake) == 0.5
    # within 2 of (0, 1): (0, 0) at 1 and (1, 0) at sqrt(2); (2, 0) is sqrt(5) away; nothing is within 2 of (0, 3)
    assert colour.recall(REAL, fake, colour.knn_radii(fake, 1)) == 0.5
    # only the ball of (0, 0) holds a fake point: (1, 0)'s radius 1 < sqrt(2)
    assert colour.coverage(REAL, radii, fake) == 0.25


def test_an_outlier_inflates_recall_not_coverage():
    """Why colour.py prints coverage: one sample far from the data has a ball reaching everything."""
    radii = colour.knn_radii(REAL, 2)
    fake = torch.tensor([[0.0, 1.0], [10.0, 0.0]], dtype=torch.float64)  # k = 1 radii sqrt(101) ~ 10.05
    assert colour.recall(REAL, fake, colour.knn_radii(fake, 1)) == 1.0
    assert colour.coverage(REAL, radii, fake) == 0.25
    assert colour.precision(REAL, radii, fake) == 0.5


def image(*colours, pixels=4):
    """(1, pixels, 1, 3): the colours in turn, as rows of a one-pixel-wide image."""
    rows = [colours[i % len(colours)] for i in range(pixels)]
    return torch.tensor(rows, dtype=torch.float64).reshape(1, pixels, 1, 3)


def test_histogram_of_known_images():
    levels = 5  # at 0, 0.25, 0.5, 0.75, 1; bin (r, g, b) is (r * 5 + g) * 5 + b
    white = colour.colour_histogram(image((1.0, 1.0, 1.0)), levels)[0]
    assert white[124] == 1 and white.sum() == 1
    # half black, half white: half the pixels in bin 0, half in bin 124, square-rooted
    half = colour.colour_histogram(image((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), levels)[0]
    assert half[0] == pytest.approx(math.sqrt(0.5)) and half[124] == pytest.approx(math.sqrt(0.5))
    # green 0.625 is halfway between levels 2 and 3: half to (4, 2, 0) = bin 110, half to (4, 3, 0) = bin 115
    orange = colour.colour_histogram(image((1.0, 0.625, 0.0)), levels)[0]
    assert orange[110] == pytest.approx(math.sqrt(0.5)) and orange[115] == pytest.approx(math.sqrt(0.5))
    assert (orange > 0).sum() == 2
    # a quarter of the way up on all three channels: the 8 corners get (3/4 or 1/4) cubed products
    dark = colour.colour_histogram(image((0.0625, 0.0625, 0.0625)), levels)[0]
    assert dark[0] == pytest.approx(math.sqrt(0.75 ** 3)) and dark[31] == pytest.approx(math.sqrt(0.25 ** 3))


def test_histogram_ignores_shape_and_has_unit_length():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 8, 8, 3, generator=generator, dtype=torch.float64)
    shuffled = images.reshape(3, 64, 3)[:, torch.randperm(64, generator=generator)].reshape(3, 8, 8, 3)
    features = colour.colour_histogram(images)
    assert torch.allclose(features, colour.colour_histogram(shuffled))
    assert torch.allclose(features.norm(dim=1), torch.ones(3, dtype=torch.float64))  # Hellinger: sqrt of a histogram


def test_cell_means():
    checkerboard = torch.zeros(1, 4, 4, 3, dtype=torch.float64)
    checkerboard[:, 0::2, 0::2] = checkerboard[:, 1::2, 1::2] = 1  # black and white pixels in turn
    checkerboard[:, :2, :, 0] = 1  # and the top half's red channel all on
    cells = colour.cell_means(checkerboard, 2)  # (1, 2, 2, 3): each 2 x 2 cell holds two white, two black pixels
    assert cells.shape == (1, 2, 2, 3)
    assert cells[0, 0].tolist() == [[1.0, 0.5, 0.5], [1.0, 0.5, 0.5]]
    assert cells[0, 1].tolist() == [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]


def test_heldout_emoji_in_colour_swapped_channels_not_blur_irrelevant():
    """The measure on the bundled data: the held-out emoji are in the training images' colours, and still are
    when blurred (sharpness is not colour); the same emoji with R, G, B read as G, B, R (blue smileys, purple
    skin) mostly are not, though their shapes are unchanged."""
    real = colour.colour_features(colour.load_images(ROOT / "data" / "emoji"))
    heldout = colour.load_images(ROOT / "data" / "emoji_test")  # (28, 32, 32, 3)
    box = torch.ones(3, 1, 3, 3, dtype=heldout.dtype) / 9
    channels_first = torch.nn.functional.pad(heldout.permute(0, 3, 1, 2), (1, 1, 1, 1), mode="replicate")
    blurred = torch.nn.functional.conv2d(channels_first, box, groups=3).permute(0, 2, 3, 1)
    radii = colour.knn_radii(real, 3)
    assert colour.precision(real, radii, colour.colour_features(heldout)) > 0.9
    assert colour.precision(real, radii, colour.colour_features(blurred)) > 0.9
    assert colour.precision(real, radii, colour.colour_features(heldout[..., [1, 2, 0]])) < 0.5
