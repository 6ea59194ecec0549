"""LLaVA image preprocessing on the host (PIL + numpy), channels-last for the JAX model.

Reproduces LLaVA-1.5's `image_aspect_ratio="pad"` path: `expand2square` on the CLIP mean colour
as 8-bit ints, then the CLIP image processor (PIL bicubic resize of the shortest edge, centre
crop, 1/255, mean/std normalisation). Output is float32 [H, W, 3]; `to_nchw` gives the PyTorch
layout for parity tests.
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from gmod_jax.data.errors import BadRecord

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    image_size: int = 336
    # "pad": LLaVA-1.5 expand2square then resize; "crop": plain CLIP (shortest edge + centre crop).
    aspect: str = "pad"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if self.aspect not in ("pad", "crop"):
            raise ValueError(f"image aspect must be 'pad' or 'crop', got {self.aspect!r}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")

    @property
    def background(self) -> tuple[int, int, int]:
        """LLaVA's `tuple(int(x * 255) for x in image_mean)`: (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.mean)

    def blank(self) -> np.ndarray:
        """Pixel values of a sample without an image."""
        return np.zeros((self.image_size, self.image_size, 3), np.float32)


def image_config_for(model_config, aspect: str = "pad") -> ImageConfig:
    """The host preprocessing a `gmod_jax.config.ModelConfig` takes, in one place: CLIP statistics
    and the pad-to-square + bicubic resize to the model's pixel input side `pixel_shape[0]` (LLaVA-1.5:
    the CLIP's 336; LLaVA-HR: its S, e.g. 1024, as its `CLIPImageProcessor` whose crop is then a
    no-op; Mini-Gemini: image_size_aux, from which the model derives its CLIP views on the device)."""
    return ImageConfig(image_size=model_config.pixel_shape[0], aspect=aspect)


def load_image(source, name: str | None = None) -> Image.Image:
    """Open an image from a path, raw bytes or a PIL image as RGB; BadRecord names the file."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        if not Path(source).is_file():
            raise BadRecord(name, f"image file not found: {source}")
        opener = lambda: Image.open(source)  # noqa: E731
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or "<bytes>"
        if not len(source):
            raise BadRecord(name, "empty image bytes")
        opener = lambda: Image.open(io.BytesIO(bytes(source)))  # noqa: E731
    else:
        raise TypeError(f"cannot load an image from {type(source).__name__}")
    try:
        with opener() as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadRecord(name, f"corrupt or unreadable image: {type(e).__name__}: {e}") from None


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    width, height = img.size
    if width == height:
        return img
    side = max(width, height)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_shortest_edge(img: Image.Image, size: int) -> Image.Image:
    """HF `get_resize_output_image_size(default_to_square=False)`: short edge -> size."""
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) == (width, height):
        return img
    return img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """HF `center_crop` on [H, W, C] (the image is at least `size` on both sides here)."""
    height, width = pixels.shape[:2]
    top, left = int((height - size) / 2), int((width - size) / 2)
    return pixels[top:top + size, left:left + size]


def preprocess_image(source, config: ImageConfig = ImageConfig(), name: str | None = None) -> np.ndarray:
    """LLaVA preprocessing of one image -> float32 [image_size, image_size, 3]."""
    img = load_image(source, name)
    if config.aspect == "pad":
        img = expand2square(img, config.background)
    img = resize_shortest_edge(img, config.image_size)
    pixels = center_crop(np.asarray(img, dtype=np.uint8), config.image_size)
    mean = np.asarray(config.mean, np.float32)
    std = np.asarray(config.std, np.float32)
    # Same arithmetic as HF's rescale (float64, then float32) and normalize (float32).
    scaled = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (scaled - mean) / std


def to_nchw(pixel_values: np.ndarray) -> np.ndarray:
    """[..., H, W, C] -> [..., C, H, W] (PyTorch / HF `pixel_values` layout)."""
    return np.moveaxis(np.asarray(pixel_values), -1, -3)


def to_nhwc(pixel_values: np.ndarray) -> np.ndarray:
    return np.moveaxis(np.asarray(pixel_values), -3, -1)
