"""Every encoding of one X-ray becomes the same tensor; bad input is refused with a clear message."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from cxr_core.preprocessing import (
    MAX_IMAGE_PIXELS,
    EvalPreset,
    InvalidImageError,
    PreprocessConfig,
    TrainPreset,
    load_image,
    preprocess,
)

CONFIG = PreprocessConfig(image_size=96)


def xray_like(width: int = 300, height: int = 240) -> np.ndarray:
    """A smooth synthetic grayscale image (gradients and a bright blob), 8-bit."""
    y, x = np.mgrid[0:height, 0:width]
    values = 40 + 120 * (x / width) + 60 * np.exp(-(((x - width / 2) ** 2 + (y - height / 2) ** 2) / 4000.0))
    return np.clip(values, 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def variants(gray: np.ndarray) -> dict[str, bytes]:
    base = Image.fromarray(gray, mode="L")
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    rgb = Image.merge("RGB", [base] * 3)
    rgba = rgb.copy()
    rgba.putalpha(255)
    rotated = base.rotate(90, expand=True)  # stored sideways, EXIF says "rotate back"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    return {
        "L png": encode(base),
        "I;16 png": encode(sixteen),
        "RGB png": encode(rgb),
        "RGBA png": encode(rgba),
        "P png": encode(base.convert("P")),
        "LA png": encode(base.convert("LA")),
        "CMYK tiff": encode(rgb.convert("CMYK"), "TIFF"),
        "exif-rotated png": encode(rotated, "PNG", exif=exif),
        "16-bit tiff": encode(sixteen, "TIFF"),
    }


def test_every_input_mode_gives_the_same_tensor():
    gray = xray_like()
    reference = preprocess(encode(Image.fromarray(gray, mode="L")), CONFIG)
    assert reference.shape == (1, 96, 96)
    assert reference.dtype == torch.float32
    for name, data in variants(gray).items():
        tensor = preprocess(data, CONFIG)
        assert tensor.shape == reference.shape, name
        # CMYK round-trips through lossy colour conversion; everything else must match to 1/255.
        tolerance = 6 / 255 / CONFIG.std[0] if "CMYK" in name else 1.01 / 255 / CONFIG.std[0]
        assert torch.allclose(tensor, reference, atol=tolerance), f"{name}: max diff {(tensor - reference).abs().max()}"


def test_jpeg_grayscale_and_rgb_agree():
    gray = xray_like()
    gray_jpeg = preprocess(encode(Image.fromarray(gray, mode="L"), "JPEG", quality=95), CONFIG)
    rgb_jpeg = preprocess(encode(Image.merge("RGB", [Image.fromarray(gray)] * 3), "JPEG", quality=95), CONFIG)
    progressive = preprocess(encode(Image.fromarray(gray, mode="L"), "JPEG", quality=95, progressive=True), CONFIG)
    assert (gray_jpeg - rgb_jpeg).abs().mean() < 0.05
    assert torch.allclose(gray_jpeg, progressive, atol=1e-6)


def test_any_size_becomes_the_configured_square():
    for size in [(17, 900), (2000, 1500), (256, 256), (1, 1)]:
        image = Image.new("L", size, 128)
        assert preprocess(image, CONFIG).shape == (1, 96, 96)


def test_three_channel_config_replicates_gray():
    config = PreprocessConfig(image_size=64, channels=3)
    tensor = preprocess(encode(Image.fromarray(xray_like(), mode="L")), config)
    assert tensor.shape == (3, 64, 64)
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_eval_preset_is_deterministic_and_normalised():
    image = load_image(encode(Image.fromarray(xray_like(), mode="L")))
    preset = EvalPreset(CONFIG)
    first, second = preset(image), preset(image)
    assert torch.equal(first, second)
    flat = preset(Image.new("L", (50, 50), 0))
    assert torch.allclose(flat, torch.full_like(flat, -CONFIG.mean[0] / CONFIG.std[0]))


def test_train_preset_augments_but_keeps_shape():
    torch.manual_seed(0)
    image = load_image(encode(Image.fromarray(xray_like(), mode="L")))
    preset = TrainPreset(CONFIG)
    outputs = [preset(image) for _ in range(4)]
    assert all(output.shape == (1, 96, 96) for output in outputs)
    assert not all(torch.equal(outputs[0], output) for output in outputs[1:])
    eval_output = EvalPreset(CONFIG)(image)
    assert (outputs[0] - eval_output).abs().mean() < 1.0  # an augmented X-ray, not noise


def test_config_round_trip():
    config = PreprocessConfig(image_size=160, channels=3, mean=(0.4,), std=(0.2,), detail=96)
    assert PreprocessConfig.from_dict(config.to_dict()) == config
    older = {key: value for key, value in config.to_dict().items() if key != "detail"}  # a checkpoint made before
    assert PreprocessConfig.from_dict(older).detail is None


def test_detail_squashes_the_film_first_and_keeps_the_input_size():
    """With `detail`, the input is the film squashed to detail x detail and then to the input size: the fine
    texture is gone, the size (and so the Grad-CAM grid) is the input size's."""
    gray = xray_like()
    gray[::2] = gray[::2] // 2  # a fine line pattern, finer than 48 px can hold
    image = Image.fromarray(gray, mode="L")
    coarse = EvalPreset(PreprocessConfig(image_size=96, detail=48))(image)
    assert coarse.shape == (1, 96, 96)
    by_hand = EvalPreset(CONFIG)(image.resize((48, 48), Image.BILINEAR))
    assert torch.allclose(coarse, by_hand, atol=1e-6)
    assert not torch.allclose(coarse, EvalPreset(CONFIG)(image), atol=0.05)
    augmented = TrainPreset(PreprocessConfig(image_size=96, detail=48), degrees=0, translate=0, scale=(1, 1),
                            brightness=0, contrast=0)(image)
    assert torch.allclose(augmented, coarse, atol=1e-6)


@pytest.mark.parametrize("detail", [0, 96, 200])
def test_a_detail_not_below_the_input_size_is_refused(detail):
    with pytest.raises(ValueError, match="detail"):
        EvalPreset(PreprocessConfig(image_size=96, detail=detail))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not an image"),
        (b"%PDF-1.4 fake", "not an image"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data, message):
    with pytest.raises(InvalidImageError, match=message):
        load_image(data)


def test_truncated_image_is_refused():
    data = encode(Image.fromarray(xray_like(), mode="L"), "JPEG", quality=90)
    with pytest.raises(InvalidImageError, match="truncated") as refused:
        load_image(data[: len(data) // 2])
    assert refused.value.kind == "truncated"


def test_decompression_bomb_is_refused_before_decoding():
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    bomb = encode(Image.new("1", (side, side)), "PNG")  # a few kB that would decode to > 50 Mpx
    assert len(bomb) < 200_000
    with pytest.raises(InvalidImageError, match="too large") as refused:
        load_image(bomb)
    assert refused.value.kind == "too_large"


def test_real_xray_loads(sample_paths):
    image = load_image(sample_paths[0])
    assert image.mode == "L"
    assert preprocess(sample_paths[0], CONFIG).shape == (1, 96, 96)


def test_large_jpegs_decode_at_reduced_size_close_to_a_full_decode():
    """Draft mode: a 2,000 px JPEG is decoded at 1/4 scale (still >= twice the model input) and the model input
    it gives stays within a few grey levels of the full decode's."""
    from tests.handler_support import encode, synthetic_xray

    config = PreprocessConfig(image_size=128)
    preset = EvalPreset(config)
    data = encode(Image.fromarray(synthetic_xray(2000, 1800), mode="L").filter(ImageFilter.GaussianBlur(2)), "JPEG",
                  quality=90)
    drafted, full = load_image(data, preset.decode_size), load_image(data)
    assert full.size == (2000, 1800) and drafted.size == (500, 450)
    assert min(drafted.size) >= preset.decode_size
    difference = (preset(drafted) - preset(full)).abs() * config.std[0] * 255
    assert float(difference.mean()) < 1.0 and float(difference.max()) < 12
    png = encode(Image.fromarray(synthetic_xray(2000, 1800), mode="L"), "PNG")
    assert load_image(png, preset.decode_size).size == (2000, 1800)  # only JPEGs have a draft mode
