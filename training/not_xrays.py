"""Images that are not chest X-rays, for fitting and scoring the out-of-distribution gate.

Built only from what installed packages ship (scikit-image's, scikit-learn's and Matplotlib's bundled data
images) plus images drawn here (text pages, charts, shapes, noise, blank and saturated frames) and transformed
training X-rays (inverted, rotated). Nothing is downloaded and nothing comes from a test split.

Every item has a stable name; `split_of(name)` puts it in "dev" (used to design the gate) or "held_out"
(only scored, reported in docs/calibration_and_gate.md). Whole source images fall on one side, so crops of a
held-out photo are never seen while designing.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from cxr.data import image_files

CATEGORIES = ("photo", "medical_not_cxr", "document", "drawing", "noise", "blank", "inverted_xray",
              "rotated_xray")


@dataclass(frozen=True)
class Item:
    name: str  # stable across runs; the split is derived from it
    category: str
    source: str  # the image it came from (crops and variants share it)
    image: Image.Image


def split_of(source: str) -> str:
    """A deterministic ~50/50 split by source image."""
    return "dev" if hashlib.sha256(source.encode()).digest()[0] % 2 == 0 else "held_out"


def _package_dir(module: str) -> Path | None:
    try:
        imported = __import__(module, fromlist=["__file__"])
    except ImportError:
        return None
    return Path(imported.__file__).parent


def bundled_images() -> Iterator[tuple[str, str, Image.Image]]:
    """(source, category, image) for the photos and non-chest medical images that packages ship."""
    medical = {"retina", "microaneurysms", "cell", "ihc", "phantom", "s1045"}
    drawings = {"logo", "logo2", "chessboard_GRAY", "chessboard_RGB", "horse", "Minduka_Present_Blue_Pack",
                "color"}
    documents = {"page", "text"}
    folders = []
    for module, sub in (("skimage", "data"), ("sklearn", "datasets/images"), ("matplotlib", "mpl-data/sample_data")):
        root = _package_dir(module)
        if root is not None and (root / sub).is_dir():
            folders.append((module, root / sub))
    for module, folder in folders:
        for path in sorted(folder.iterdir()):
            stem = path.stem.split(".")[0]
            if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
                image = Image.open(path)
                image.load()
            elif path.name == "s1045.ima.gz":  # a 256x256 16-bit MR slice
                pixels = np.frombuffer(gzip.open(path).read(), dtype="<u2").reshape(256, 256)
                image = Image.fromarray((pixels / max(int(pixels.max()), 1) * 255).astype(np.uint8))
            else:
                continue
            category = ("medical_not_cxr" if stem in medical else "drawing" if stem in drawings else
                        "document" if stem in documents else "photo")
            yield f"{module}/{stem}", category, image
    skimage_root = _package_dir("skimage")
    if skimage_root is not None and (skimage_root / "data" / "lfw_subset.npy").exists():
        faces = np.load(skimage_root / "data" / "lfw_subset.npy")
        for index in range(0, len(faces), 4):  # 50 of the 200 faces, 25x25 each
            face = Image.fromarray((faces[index] * 255).astype(np.uint8)).resize((128, 128), Image.BICUBIC)
            yield f"skimage/lfw_{index}", "photo", face


def _crops(image: Image.Image, rng: np.random.Generator, count: int) -> Iterator[Image.Image]:
    width, height = image.size
    for _ in range(count):
        side = int(rng.uniform(0.3, 0.9) * min(width, height))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        yield image.crop((left, top, left + side, top + side))


def _text_page(rng: np.random.Generator, words: list[str]) -> Image.Image:
    width, height = int(rng.integers(600, 1000)), int(rng.integers(800, 1300))
    paper = int(rng.integers(200, 256))
    page = Image.new("L", (width, height), paper)
    draw = ImageDraw.Draw(page)
    y = int(rng.integers(20, 80))
    size = int(rng.integers(12, 40))
    while y < height - size:
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        draw.text((int(rng.integers(10, 80)), y), line, fill=int(rng.integers(0, 90)), font_size=size)
        y += int(size * rng.uniform(1.2, 2.0))
    return page


def _chart(rng: np.random.Generator) -> Image.Image:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(rng.uniform(4, 8), rng.uniform(3, 6)), dpi=80)
    kind = int(rng.integers(0, 3))
    values = rng.normal(size=(int(rng.integers(5, 40)),)).cumsum()
    if kind == 0:
        axes.plot(values)
    elif kind == 1:
        axes.bar(range(len(values)), np.abs(values))
    else:
        axes.scatter(rng.normal(size=60), rng.normal(size=60))
    axes.set_title("figure")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("L")


def _shapes(rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(128, 600))
    canvas = Image.new("L", (size, size), int(rng.integers(0, 256)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(3, 30))):
        box = sorted(rng.integers(0, size, 2)), sorted(rng.integers(0, size, 2))
        xy = (box[0][0], box[1][0], box[0][1], box[1][1])
        kind = int(rng.integers(0, 3))
        shade = int(rng.integers(0, 256))
        if kind == 0:
            draw.ellipse(xy, outline=shade, width=int(rng.integers(1, 8)))
        elif kind == 1:
            draw.rectangle(xy, fill=shade)
        else:
            draw.line(xy, fill=shade, width=int(rng.integers(1, 12)))
    return canvas


def _noise(rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(96, 512))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        pixels = rng.integers(0, 256, (size, size))
    elif kind == 1:
        pixels = rng.normal(rng.uniform(60, 200), rng.uniform(10, 60), (size, size))
    elif kind == 2:
        pixels = np.where(rng.random((size, size)) < 0.5, 0, 255)
    else:  # smooth (blurred) noise: blobs with no anatomy
        image = Image.fromarray(rng.integers(0, 256, (size, size)).astype(np.uint8))
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(2, 12)))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _blank(rng: np.random.Generator) -> Image.Image:
    size = int(rng.integers(96, 1024))
    level = float(rng.choice([0, 255, rng.uniform(0, 255)]))
    noise = rng.normal(0, rng.choice([0, 1, 3]), (size, size))
    return Image.fromarray(np.clip(level + noise, 0, 255).astype(np.uint8))


def _xray_paths(data_roots: list[Path], per_root: int, rng: np.random.Generator) -> list[Path]:
    paths = []
    for root in data_roots:
        files = image_files(root / "train", "*/*")
        if files:
            paths.extend(files[i] for i in rng.choice(len(files), size=min(per_root, len(files)), replace=False))
    return paths


def not_xrays(data_roots: list[Path] = (), crops_per_photo: int = 6, synthetic_per_kind: int = 60,
              seed: int = 0) -> list[Item]:
    """The whole negative set, deterministic for a seed. `data_roots` (ImageFolder roots) give the training
    X-rays that are inverted and rotated; without them those two categories are empty."""
    rng = np.random.default_rng(seed)
    items = []
    for source, category, image in bundled_images():
        items.append(Item(source, category, source, image))
        if min(image.size) >= 256:
            for k, crop in enumerate(_crops(image, rng, crops_per_photo)):
                items.append(Item(f"{source}#crop{k}", category, source, crop))
    words = ("patient report radiology department signed date result normal finding impression chest "
             "invoice total amount please note the and of to in page summary").split()
    makers = {"document": lambda: _text_page(rng, words), "drawing": lambda: _chart(rng) if rng.random() < 0.4
              else _shapes(rng), "noise": lambda: _noise(rng), "blank": lambda: _blank(rng)}
    for category, make in makers.items():
        for k in range(synthetic_per_kind):
            name = f"synthetic/{category}_{k}"
            items.append(Item(name, category, name, make()))
    for k, path in enumerate(_xray_paths(list(data_roots), synthetic_per_kind // 2, rng)):
        with Image.open(path) as opened:
            xray = ImageOps.grayscale(opened)
        source = f"{path.parent.parent.parent.name}/{path.parent.name}/{path.name}"
        items.append(Item(f"inverted/{source}", "inverted_xray", source, ImageOps.invert(xray)))
        angle = (90, 180, 270)[k % 3]
        items.append(Item(f"rotated{angle}/{source}", "rotated_xray", source, xray.rotate(angle, expand=True)))
    return items
