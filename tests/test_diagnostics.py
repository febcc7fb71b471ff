import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.attention_pool import PoolShape
from model.selfie import build_selfie
from train.engine.curves import plot_curves
from train.methods.pictures import (
    PICTURE_GAP,
    RIGHT_BORDER,
    WRONG_BORDER,
    picture_size,
    render_patch_picture,
    write_png,
)
from train.methods.selfie import patch_picture


def fixed_inputs(batch: int = 4, size: int = 32, patch: int = 8, num_context: int = 12):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    perm = torch.stack([torch.randperm((size // patch) ** 2, generator=generator) for _ in range(batch)])
    return images, perm, num_context


def test_picture_has_the_expected_size() -> None:
    # 4 rows of 3 panels; 8-pixel patches are enlarged 4x, so a 32x32 image is a 128-pixel panel.
    assert picture_size(4, 32, 8) == (3 * 128 + 4 * PICTURE_GAP, 4 * 128 + 5 * PICTURE_GAP) == (400, 532)
    assert picture_size(2, 224, 32) == (3 * 224 + 4 * PICTURE_GAP, 2 * 224 + 3 * PICTURE_GAP)
    images, perm, num_context = fixed_inputs()
    choices = torch.arange(4).expand(4, 4)
    picture = render_patch_picture(images, perm, num_context, 8, choices)
    assert picture.shape == (532, 400, 3) and picture.dtype == np.uint8


def slot_border(picture: np.ndarray, row: int, position: int, grid: int = 4, cell: int = 32) -> np.ndarray:
    """The top edge pixels of masked slot `position` in the answer panel of image `row`."""
    panel = grid * cell
    y = PICTURE_GAP + row * (panel + PICTURE_GAP) + (position // grid) * cell
    x = PICTURE_GAP + 2 * (panel + PICTURE_GAP) + (position % grid) * cell
    return picture[y, x : x + cell]


def test_right_choices_are_framed_white_and_wrong_ones_red_with_the_chosen_content() -> None:
    images, perm, num_context = fixed_inputs()
    masked = perm[:, num_context:]
    right = render_patch_picture(images, perm, num_context, 8, torch.arange(4).expand(4, 4))
    swapped = torch.tensor([[1, 0, 2, 3]] * 4)  # slots 0 and 1 exchanged, 2 and 3 right
    wrong = render_patch_picture(images, perm, num_context, 8, swapped)
    for row in range(4):
        for j in range(4):
            position = int(masked[row, j])
            assert (slot_border(right, row, position) == RIGHT_BORDER).all()
            expected = WRONG_BORDER if j < 2 else RIGHT_BORDER
            assert (slot_border(wrong, row, position) == expected).all()
    # Inside the frame of slot 0 sits the patch of masked slot 1, enlarged.
    position, source = int(masked[0, 0]), int(masked[0, 1])
    y = PICTURE_GAP + (position // 4) * 32 + 8
    x = PICTURE_GAP + 2 * (128 + PICTURE_GAP) + (position % 4) * 32 + 8
    pixel = images[0, :, (source // 4) * 8 + 2, (source % 4) * 8 + 2].numpy()
    assert (wrong[y, x] == pixel).all()
    # The middle panel greys out exactly the masked slots.
    given_x = PICTURE_GAP + 128 + PICTURE_GAP
    assert (right[PICTURE_GAP + (position // 4) * 32 + 5, given_x + (position % 4) * 32 + 5] == 128).all()


def test_patch_picture_runs_the_model_and_restores_its_mode(tmp_path: Path) -> None:
    model = build_selfie(width=0.125, grid=4, pool=PoolShape(layers=1, intermediate=32, heads=4))
    model.train()
    images, perm, num_context = fixed_inputs()
    picture = patch_picture(model, images, perm, num_context, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert model.training
    path = tmp_path / "pictures" / "patches_step_00000001.png"
    write_png(path, picture)
    assert Image.open(path).size == picture_size(4, 32, 8)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_curves_are_drawn_from_the_log(tmp_path: Path) -> None:
    records = [
        {"step": s, "loss": 2 / s, "patch_acc": 0.1 * s, "chance_acc": 0.25, "lr": 0.1, "images_per_s": 100}
        for s in range(1, 6)
    ]
    records.insert(2, {"event": "skipped_image", "step": 2, "image": "x.jpg: broken", "skipped_total": 1})
    records.append({"step": 5, "test_acc": 0.5, "test_loss": 1.0, "test_images": 10})
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_curves(log, tmp_path / "curves.png", "title")
    width, height = Image.open(tmp_path / "curves.png").size
    assert width == 1600 and height == 320  # four panels of 4 x 3.2 inches at 100 dpi
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.jsonl"]  # no temporary file left


def test_without_matplotlib_the_curves_are_skipped_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    """A machine without matplotlib (a GPU machine may lack it): a run's checkpoints draw no curves and
    say so once, instead of ending the run."""
    import sys

    from train.engine import curves

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 2 / s}) + "\n" for s in range(1, 4)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an uninstalled package looks like to import
    monkeypatch.setattr(curves, "_SKIP_SAID", [])
    for _ in range(3):  # three checkpoints
        plot_curves(log, tmp_path / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and "no curves.png" in printed[0] and "matplotlib" in printed[0], printed


def test_curve_panels_take_whatever_metrics_the_log_has(tmp_path: Path) -> None:
    """A method's own accuracy key (any `*_acc`) is drawn without being named anywhere."""
    from train.engine.curves import CURVE_PANELS

    wanted = dict(CURVE_PANELS)
    assert wanted["accuracy"]("toy_acc") and wanted["accuracy"]("chance_acc") and not wanted["accuracy"]("loss")
    assert wanted["loss"]("loss") and wanted["loss"]("test_loss") and not wanted["loss"]("lr")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "toy_acc": 0.1 * s}) + "\n" for s in range(1, 4)))
    plot_curves(log, tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size == (400, 320)  # one panel: accuracy


def test_one_huge_monitor_loss_leaves_the_training_loss_readable() -> None:
    """An early clean_loss of thousands must not flatten the training loss (1.4 .. 0.9) into one pixel row."""
    from train.engine.curves import curves_figure

    records = [{"step": s, "loss": 1.4 - 0.05 * s, "clean_loss": 2143.0 if s == 1 else 1.2} for s in range(1, 11)]
    figure = curves_figure(records)
    loss_axes = figure.axes[0]
    low, high = loss_axes.get_ylim()
    assert loss_axes.get_yscale() == "log"
    assert low <= 0.9 and 1.4 <= high < 2143
    assert "above" in loss_axes.get_title()  # the clipped point is shown on the edge and said so


def bright_columns(band: np.ndarray) -> np.ndarray:
    """x positions where the header band holds text (pixels far brighter than its background)."""
    return np.nonzero((band.astype(int).sum(-1) > 3 * 160).any(0))[0]


def test_pictures_name_their_columns_and_frame_colours() -> None:
    from train.methods.pictures import FRAME_LEGEND, PATCH_COLUMNS, patch_column_centers, with_header
    from train.methods.rotation import view_titles

    grid = np.zeros((100, 400, 3), dtype=np.uint8)
    centers = patch_column_centers(32, 8)
    labelled = with_header(grid, PATCH_COLUMNS, centers, FRAME_LEGEND)
    band_height = labelled.shape[0] - len(grid)
    assert band_height > 0 and (labelled[band_height:] == grid).all()
    titles = bright_columns(labelled[: band_height // 2])
    for center in centers:  # a title sits over every panel
        assert np.abs(titles - center).min() < 10
    assert len(bright_columns(labelled[band_height // 2 : band_height])) > 50  # the legend line
    assert view_titles(4) == ["0°", "90°", "180°", "270°"]
    assert view_titles(8)[4:] == ["patch 0°", "patch 90°", "patch 180°", "patch 270°"]
