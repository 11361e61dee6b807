"""The pointing game: box mapping onto the squashed input, the hit rule, the chance baseline, and the whole game
and its command on a tiny model with a synthetic film (no real data)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_core.checkpoint import load_checkpoint
from tests.handler_support import synthetic_xray, write_tiny_checkpoint
from training import pointing

FILM_SIZE = (200, 100)  # width, height: not square, so x and y scale differently onto the 64 px input


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict:
    return load_checkpoint(write_tiny_checkpoint(tmp_path_factory.mktemp("pointing") / "model.pt", image_size=64))


@pytest.fixture
def film(tmp_path):
    path = tmp_path / "film.png"
    Image.fromarray(synthetic_xray(*FILM_SIZE), mode="L").save(path)
    return path


def test_boxes_scale_with_each_side_of_the_film():
    assert pointing.box_on_input((100, 50, 20, 10), (200, 100), 64) == pytest.approx((32, 32, 6.4, 6.4))
    assert pointing.parse_boxes("151.2 139.8 26.5 18.8;1 2 3 4") == ((151.2, 139.8, 26.5, 18.8), (1, 2, 3, 4))
    assert pointing.parse_boxes("") == ()


def test_the_peak_is_a_pixel_centre_and_hits_inside_a_box_edges_included():
    heatmap = np.zeros((8, 8))
    heatmap[2, 5] = 1.0
    assert pointing.peak(heatmap) == (5.5, 2.5)
    assert pointing.peak(np.zeros((8, 8))) is None
    boxes = [(0, 0, 1, 1), (5.5, 2.0, 1.0, 0.5)]
    assert pointing.inside_any((5.5, 2.5), boxes)
    assert not pointing.inside_any((5.4, 2.5), boxes)


def test_union_share_counts_overlaps_once_and_clips_to_the_film():
    assert pointing.union_share([(0, 0, 50, 100)], (100, 100)) == pytest.approx(0.5)
    assert pointing.union_share([(0, 0, 50, 50), (25, 25, 50, 50)], (100, 100)) == pytest.approx(0.4375)
    assert pointing.union_share([(80, 80, 50, 50)], (100, 100)) == pytest.approx(0.04)
    assert pointing.union_share([], (100, 100)) == 0.0


def test_intervals_and_chance():
    low, high = pointing.wilson_interval(5, 68)
    assert 0.0 < low < 5 / 68 < high < 0.2
    assert pointing.chance_p_value(0, [0.1] * 10) == pytest.approx(1.0)
    assert pointing.chance_p_value(10, [0.5] * 10) == pytest.approx(0.5**10)
    assert pointing.chance_p_value(1, [0.2, 0.3]) == pytest.approx(1 - 0.8 * 0.7)


def test_a_peak_inside_a_box_is_a_hit_and_outside_a_miss(checkpoint, film, monkeypatch):
    """The heatmap's peak is forced to input pixel (x 48, y 16): film x 48*200/64 = 150, film y 16*100/64 = 25."""
    def fake_cam(model, arch, batch, targets, needed):
        heatmaps = np.zeros((len(batch), 64, 64))
        heatmaps[:, 16, 48] = 1.0
        return heatmaps

    monkeypatch.setattr(pointing, "grad_cam", fake_cam)
    around = (140.0, 20.0, 20.0, 10.0)  # covers film x 140-160, y 20-30: the peak's centre (151.6, 25.8)
    beside = (100.0, 20.0, 20.0, 10.0)
    result = pointing.pointing_game(checkpoint, [(film, (around,)), (film, (beside,)), (film, (beside, around))],
                                    target=1, batch_size=2)
    assert [record["hit"] for record in result["per_film"]] == [True, False, True]
    assert result["films"] == 3 and result["hits"] == 2 and result["share"] == pytest.approx(2 / 3)
    assert result["baseline_share"] == pytest.approx(np.mean([0.01, 0.01, 0.02]))
    assert result["ci95"][0] < 2 / 3 < result["ci95"][1]
    assert 0.0 <= result["random_point_share"] <= 1.0


def test_the_command_writes_numbers_and_a_figure(checkpoint, film, tmp_path):
    torch.save(checkpoint, tmp_path / "model.pt")
    data = tmp_path / "rsna"
    (data / "test" / "OPACITY").mkdir(parents=True)
    Image.open(film).save(data / "test" / "OPACITY" / "a.png")
    (data / "manifest.csv").write_text("file,label,split,opacity_boxes_xywh\n"
                                       "test/OPACITY/a.png,OPACITY,test,10 10 50 40;100 20 60 60\n"
                                       "test/NO_OPACITY/b.png,NO_OPACITY,test,\n")
    args = pointing.get_args_parser().parse_args(
        ["--checkpoint", str(tmp_path / "model.pt"), "--data", str(data), "--output-dir", str(tmp_path / "out"),
         "--examples", "2", "--threads", str(torch.get_num_threads())])  # keep this process's threads
    result = pointing.main(args)
    written = json.loads((tmp_path / "out" / "pointing.json").read_text())
    assert written["films"] == result["films"] == 1 and written["target"] == "PNEUMONIA"
    assert written["hits"] in (0, 1) and (tmp_path / "out" / "pointing.png").stat().st_size > 0
