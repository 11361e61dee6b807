"""The data check that `make model` runs before training: the three layouts plan as they should, and every bad input
stops with one line naming the fix. Films are made from the committed example X-rays (shrunk, re-encoded at other
JPEG qualities and cropped by a few pixels, so every file is distinct); no data set is needed except by the slow
test, which plans rsna/ itself."""

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cxr.data import image_files
from cxr.paths import EXAMPLE_XRAYS
from loadtest.hostile import dicom_file
from tests.conftest import required_dataset
from training.own_data import DataError, DataPlan, describe, get_args_parser, main, plan_data, split_counts

CLASSES = ("NORMAL", "PNEUMONIA")
VARIANTS = 8  # distinct films per example X-ray: 80 per class


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def small_xrays() -> dict[str, list[Image.Image]]:
    """The 10 example X-rays of each class, shrunk to 160 px (decoding stays cheap)."""
    images: dict[str, list[Image.Image]] = {name: [] for name in CLASSES}
    for path in image_files(EXAMPLE_XRAYS, "*/*"):
        image = Image.open(path).convert("L")
        image.thumbnail((160, 160))
        images[path.parent.name].append(image)
    return images


@pytest.fixture(scope="module")
def films(small_xrays) -> dict[str, list[bytes]]:
    """80 distinct JPEG films per class: each example X-ray cropped by 0-2 pixels and encoded at 60-95 quality."""
    pool = {name: [] for name in CLASSES}
    for name, images in small_xrays.items():
        for image in images:
            width, height = image.size
            for k in range(VARIANTS):
                pool[name].append(jpeg(image.crop((k % 3, k // 3, width - k % 2, height)), quality=60 + 5 * k))
    assert all(len(set(data)) == len(data) == 10 * VARIANTS for data in pool.values())
    return pool


def write_films(folder: Path, data: list[bytes], start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{folder.name.lower()}_{start + index:03d}.jpeg" for index in range(len(data))]
    for path, content in zip(paths, data, strict=True):
        path.write_bytes(content)
    return paths


def class_tree(root: Path, films: dict[str, list[bytes]], counts: dict[str, int]) -> Path:
    """`<root>/<CLASS>/` with counts[CLASS] films (a third class reuses NORMAL's films after NORMAL's own)."""
    for name, count in counts.items():
        source = films.get(name) or films["NORMAL"][::-1]
        write_films(root / name, source[:count])
    return root


def split_tree(root: Path, films: dict[str, list[bytes]], counts: dict[str, dict[str, int]]) -> Path:
    """`<root>/<split>/<CLASS>/` with counts[split][CLASS] films, no film in two splits."""
    used = dict.fromkeys(CLASSES, 0)
    for split, per_class in counts.items():
        for name, count in per_class.items():
            write_films(root / split / name, films[name][used[name]:used[name] + count], start=used[name])
            used[name] += count
    return root


def all_paths(plan: DataPlan) -> list[Path]:
    return [film.path for films in plan.splits.values() for film in films]


def patients_by_split(plan: DataPlan) -> dict[str, set[str]]:
    return {split: {film.patient for film in films} for split, films in plan.splits.items()}


def assert_no_patient_on_two_sides(plan: DataPlan) -> None:
    seen = patients_by_split(plan)
    assert not seen["train"] & seen["val"] and not seen["train"] & seen["test"] and not seen["val"] & seen["test"]


# --- the three layouts ---------------------------------------------------------------------------------------------

def test_split_folders_are_kept_as_given_with_patients_from_the_manifest(tmp_path, films):
    counts = {"train": {"NORMAL": 12, "PNEUMONIA": 10}, "val": {"NORMAL": 4, "PNEUMONIA": 3},
              "test": {"NORMAL": 4, "PNEUMONIA": 3}}
    root = split_tree(tmp_path / "data", films, counts)
    files = sorted(path.relative_to(root).as_posix() for path in root.rglob("*.jpeg"))
    with open(root / "manifest.csv", "w", newline="") as handle:  # the shared data sets' manifest shape
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "split", "patient", "source_sha256"])
        for number, file in enumerate(files):
            patient = "p-shared" if file in (files[0], files[-1]) else f"p{number}"
            writer.writerow([file, file.split("/")[1], file.split("/")[0], patient, "0" * 64])
    plan = plan_data(root, name="mine", positive="PNEUMONIA", min_per_class=10)
    assert plan.layout == "split_folders" and plan.class_names == CLASSES and plan.positive_class == "PNEUMONIA"
    assert split_counts(plan) == {"train": [12, 10], "val": [4, 3], "test": [4, 3]}
    assert plan.left_out == [] and plan.gate_checked
    assert all(film.patient is not None for films in plan.splits.values() for film in films)
    assert plan.split_rule.startswith("splits as given") and "puts 1 patients in more than one split" in plan.split_rule
    assert re.search(r"train\s+12\s+10\s+22", describe(plan))


def test_class_folders_split_seeded_and_stratified_by_film(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 40, "PNEUMONIA": 20})
    plan = plan_data(root, name="mine", positive="PNEUMONIA", min_per_class=10)
    assert plan.layout == "class_folders"
    assert split_counts(plan) == {"train": [28, 14], "val": [6, 3], "test": [6, 3]}
    paths = all_paths(plan)
    assert len(paths) == len(set(paths)) == 60 and set(paths) == set(root.rglob("*.jpeg"))
    assert "split here by film" in plan.split_rule and "seed 0" in plan.split_rule and "70/15/15" in plan.split_rule
    again = plan_data(root, name="mine", positive="PNEUMONIA", min_per_class=10)
    other = plan_data(root, name="mine", positive="PNEUMONIA", min_per_class=10, seed=1)
    assert again.splits == plan.splits and other.splits["test"] != plan.splits["test"]


def test_class_folders_split_by_patient_from_the_manifest(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 40, "PNEUMONIA": 30})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient", "view"])
        for name, per_patient in (("NORMAL", 2), ("PNEUMONIA", 3)):
            for index, path in enumerate(sorted((root / name).iterdir())):
                writer.writerow([f"{name}/{path.name}", name, f"{name[0]}{index // per_patient}", "PA"])
    plan = plan_data(root, name="mine", positive="PNEUMONIA", min_per_class=10)
    assert_no_patient_on_two_sides(plan)
    counts = split_counts(plan)
    assert [sum(split[k] for split in counts.values()) for k in range(2)] == [40, 30]
    assert counts["train"] == [28, 24] and all(min(split) > 0 for split in counts.values())
    assert "by patient (30 patients from the manifest.csv patient column" in plan.split_rule


def test_multi_class_needs_no_positive_class(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 20, "PNEUMONIA": 20, "OTHER": 20})
    plan = plan_data(root, name="three", positive=None, min_per_class=20)
    assert plan.class_names == ("NORMAL", "OTHER", "PNEUMONIA") and plan.positive_class is None
    assert split_counts(plan) == {"train": [14, 14, 14], "val": [3, 3, 3], "test": [3, 3, 3]}


def test_dicom_folder_with_a_labels_csv_split_by_patient(tmp_path, small_xrays):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    rows = []
    for name, images in small_xrays.items():
        for index in range(24):  # 12 patients of 2 films each, a few pixels apart
            pixels = np.asarray(images[index % 10])[index // 10:, :]
            file = f"images/{name.lower()}_{index:02d}.dcm"
            (root / file).write_bytes(dicom_file(np.ascontiguousarray(pixels)))
            rows.append([file, name, f"{name}-{index // 2}"])
    (root / "images" / "stray.dcm").write_bytes(dicom_file(np.asarray(small_xrays["NORMAL"][0])))
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label", "patient"], *rows])
    plan = plan_data(root, name="dicoms", positive="PNEUMONIA", min_per_class=20)
    assert plan.layout == "csv_labels" and plan.class_names == CLASSES
    assert_no_patient_on_two_sides(plan)
    assert sum(map(sum, split_counts(plan).values())) == 48 and split_counts(plan)["train"] == [16, 16]
    assert "by patient (24 patients from the CSV patient column" in plan.split_rule
    assert [(item.path.name, item.reason) for item in plan.left_out] == [("stray.dcm", "not in labels.csv")]


# --- bad input: one line, the problem and the fix ------------------------------------------------------------------

@pytest.mark.parametrize(("name", "words"), [
    ("pneumonia", "NAME=pneumonia is a model already served"),
    ("cxr4", "already served"),
    ("adult_onnx", "ends with the variant suffix _onnx"),
    ("adult_eager", "variant suffix _eager"),
    ("Adult", "is not a plain name"),
    ("adult model", "is not a plain name"),
    ("../adult", "is not a plain name"),
])
def test_a_name_that_clashes_or_is_not_plain_is_refused(tmp_path, name, words):
    with pytest.raises(DataError, match=words) as error:
        plan_data(tmp_path, name=name, positive=None)
    assert "choose" in str(error.value) or "use 1-40 lowercase" in str(error.value)


def test_missing_split_or_class_in_a_split(tmp_path, films):
    root = split_tree(tmp_path / "a", films, {"train": {"NORMAL": 5, "PNEUMONIA": 5}, "val": {"NORMAL": 2}})
    with pytest.raises(DataError, match=r"split folder test/ missing .*add it with one folder per class"):
        plan_data(root, name="mine", positive="PNEUMONIA")
    (root / "test" / "NORMAL").mkdir(parents=True)
    with pytest.raises(DataError, match=r"class PNEUMONIA has no films in val/ .*add PNEUMONIA films to val/PNEUMONIA"):
        plan_data(root, name="mine", positive="PNEUMONIA")


def test_one_class_too_few_films_and_the_positive_class(tmp_path, films):
    one = class_tree(tmp_path / "one", films, {"NORMAL": 30})
    with pytest.raises(DataError, match="one class only .NORMAL.: a model needs two or more"):
        plan_data(one, name="mine", positive=None)
    few = class_tree(tmp_path / "few", films, {"NORMAL": 30, "PNEUMONIA": 12})
    with pytest.raises(DataError, match="class PNEUMONIA has 12 films, fewer than 20: add at least 8 more"):
        plan_data(few, name="mine", positive="PNEUMONIA")
    with pytest.raises(DataError, match="POSITIVE=COVID19 is not a class of .*: use one of NORMAL, PNEUMONIA"):
        plan_data(few, name="mine", positive="COVID19")
    with pytest.raises(DataError) as error:
        plan_data(few, name="mine", positive=None)
    assert str(error.value) == "binary data set: name the positive class with POSITIVE=<one of NORMAL, PNEUMONIA>"


def test_labels_that_name_no_file_are_listed(tmp_path, films):
    root = tmp_path / "data"
    paths = write_films(root / "files", films["NORMAL"][:20]) + write_films(root / "more", films["PNEUMONIA"][:20])
    rows = [[path.relative_to(root).as_posix(), path.parent.name] for path in paths]
    rows += [[f"files/gone_{index}.dcm", "NORMAL"] for index in range(12)]
    with open(root / "labels.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([["file", "label"], *rows])
    with pytest.raises(DataError) as error:
        plan_data(root, name="mine", positive="more", min_per_class=5)
    message = str(error.value)
    assert "12 labels in" in message and "name no file" in message and "fix the file column" in message
    assert "files/gone_9.dcm" in message and "files/gone_10.dcm" not in message and "(2 more)" in message


def test_bad_csv_header_missing_patient_rows_and_empty_folders(tmp_path, films):
    root = tmp_path / "data"
    write_films(root / "files", films["NORMAL"][:3])
    (root / "labels.csv").write_text("path,class\nfiles/normal_000.jpeg,NORMAL\n")
    with pytest.raises(DataError, match="needs file,label"):
        plan_data(root, name="mine", positive=None)
    tree = class_tree(tmp_path / "tree", films, {"NORMAL": 20, "PNEUMONIA": 20})
    (tree / "manifest.csv").write_text("file,patient\nNORMAL/normal_000.jpeg,p1\n")
    with pytest.raises(DataError, match=r"39 films have no patient in .*manifest.csv.*add their rows"):
        plan_data(tree, name="mine", positive="PNEUMONIA")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no labelled X-rays: put one folder per class"):
        plan_data(tmp_path / "empty", name="mine", positive=None)
    with pytest.raises(DataError, match="is not a folder"):
        plan_data(tmp_path / "nowhere", name="mine", positive=None)


# --- unreadable files and what is no chest X-ray -------------------------------------------------------------------

def noise_photo() -> bytes:
    """A colour photograph-like frame of noise (the gate's "noise" kind of non-X-ray)."""
    return jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (160, 200, 3), dtype=np.uint8)))


def document() -> bytes:
    page = Image.new("L", (200, 260), 255)
    draw = ImageDraw.Draw(page)
    for y in range(10, 250, 12):
        draw.text((10, y), "Lorem ipsum dolor sit amet, consectetur", fill=0)
    return jpeg(page)


def test_an_unreadable_file_under_one_percent_is_left_out_and_listed(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 60, "PNEUMONIA": 60})
    (root / "NORMAL" / "broken.jpeg").write_bytes(b"this is no image")
    plan = plan_data(root, name="mine", positive="PNEUMONIA")
    assert [(item.path.name, item.reason.split(":")[0]) for item in plan.left_out] == [("broken.jpeg", "unreadable")]
    assert sum(map(sum, split_counts(plan).values())) == 120 and root / "NORMAL" / "broken.jpeg" not in all_paths(plan)
    assert "NORMAL/broken.jpeg: unreadable" in describe(plan)


def test_one_percent_or_more_bad_files_stop_the_plan(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 50, "PNEUMONIA": 49})
    (root / "PNEUMONIA" / "notes.txt").write_text("scanned on the new detector")
    with pytest.raises(DataError, match=r"1 of 100 files \(1.0%\) are unreadable or not chest X-rays: "
                                        r"PNEUMONIA/notes.txt \(not an image file \(.txt\)\).*remove or replace"):
        plan_data(root, name="mine", positive="PNEUMONIA")


def test_the_gate_refuses_a_photo_and_a_document(tmp_path, films):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 60, "PNEUMONIA": 60})
    (root / "PNEUMONIA" / "holiday.jpeg").write_bytes(noise_photo())
    plan = plan_data(root, name="mine", positive="PNEUMONIA")
    [refused] = plan.left_out
    assert refused.path.name == "holiday.jpeg" and refused.reason.startswith("not a chest X-ray (gate score")
    ungated = plan_data(root, name="mine", positive="PNEUMONIA", gate_path=None)
    assert ungated.left_out == [] and not ungated.gate_checked and "not gated" in describe(ungated)
    (root / "NORMAL" / "letter.jpeg").write_bytes(document())
    with pytest.raises(DataError, match=r"2 of 122 files .* not chest X-rays: NORMAL/letter.jpeg \(not a chest X-ray"):
        plan_data(root, name="mine", positive="PNEUMONIA")


# --- the command line ----------------------------------------------------------------------------------------------

def test_cli_prints_the_plan_or_stops_with_the_one_line(tmp_path, films, capsys):
    root = class_tree(tmp_path / "data", films, {"NORMAL": 20, "PNEUMONIA": 20})
    main(get_args_parser().parse_args(["--data", str(root), "--name", "mine", "--positive", "PNEUMONIA"]))
    shown = capsys.readouterr().out
    assert "ImageFolder without splits" in shown and "positive class PNEUMONIA" in shown
    assert re.search(r"train\s+14\s+14\s+28", shown) and "split here by film" in shown and "left out: 0" in shown
    with pytest.raises(SystemExit) as stop:
        main(get_args_parser().parse_args(["--data", str(root), "--name", "mine"]))
    assert stop.value.code == "binary data set: name the positive class with POSITIVE=<one of NORMAL, PNEUMONIA>"


# --- the real adult films ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_rsna_plans_as_its_readme_says():
    """rsna/ as given: the README's table, less the few films the gate refuses (under 1%, listed)."""
    root = required_dataset("rsna")
    plan = plan_data(root, name="adult_films", positive="OPACITY")
    assert plan.layout == "split_folders" and plan.class_names == ("NO_OPACITY", "OPACITY")
    counts = split_counts(plan)
    for item in plan.left_out:
        split, name = item.path.relative_to(root).parts[:2]
        counts[split][plan.class_names.index(name)] += 1
    assert counts == {"train": [637, 204], "val": [213, 68], "test": [212, 68]}
    assert len(plan.left_out) < 0.01 * 1402
