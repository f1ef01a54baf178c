"""Request images -> model inputs: decoding under limits, then the base model's own preprocessing.

Any image PIL can read is accepted and converted to the model's channels (``"L"`` for one channel,
``"RGB"`` for three), then run through timm's evaluation transform for the base model's data config
(resize, centre crop, normalise), as ``learnable-memory predict`` does.
"""

from __future__ import annotations

import base64
import binascii
import io

import torch
from PIL import Image, UnidentifiedImageError

from .. import data as D
from .settings import ServeError


def decode_base64(text: str, where: str) -> bytes:
    """The bytes of a base64 image, with or without a ``data:image/...;base64,`` prefix (422 if not base64)."""
    if not isinstance(text, str):
        raise ServeError(422, f"{where}: expected a base64 string, got {type(text).__name__}", "bad_request")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ServeError(422, f"{where}: not valid base64 ({err}); send the file's bytes base64-encoded",
                         "bad_request") from err


class Preprocessor:
    """Bytes of one image -> ``[C, H, W]`` float tensor for the model.

    Args:
        data_config: The base model's timm data config (``MemoryViT.data_config()``).
        max_pixels: Largest width x height accepted (413 beyond); PIL's own decompression-bomb guard
            (``Image.MAX_IMAGE_PIXELS``) applies as well.
    """

    def __init__(self, data_config: dict, max_pixels: int):
        channels = data_config["input_size"][0]
        if channels not in (1, 3):
            raise ValueError(f"the server feeds images as grayscale or RGB, but this model takes {channels} "
                             "channels")
        self.transform = D.model_transform(data_config)
        self.mode = D.pil_mode(data_config)
        self.max_pixels = max_pixels

    def __call__(self, data: bytes, where: str) -> torch.Tensor:
        """Decode and preprocess; ``where`` names the image in error messages (e.g. ``"image 2 (cat.png)"``)."""
        return self.transform(self.decode(data, where))

    def decode(self, data: bytes, where: str) -> Image.Image:
        """The image in the model's PIL mode: 413 for too many pixels, 400 for bytes PIL can not read."""
        if not data:
            raise ServeError(400, f"{where}: empty file", "bad_image")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > self.max_pixels:
                    raise ServeError(413, f"{where}: {width}x{height} = {width * height} pixels, more than the "
                                     f"{self.max_pixels} allowed per image; send a smaller image", "too_large")
                return img.convert(self.mode)
        except ServeError:
            raise
        except Image.DecompressionBombError as err:
            raise ServeError(413, f"{where}: {err}", "too_large") from err
        except UnidentifiedImageError as err:
            raise ServeError(400, f"{where}: not an image format PIL can read", "bad_image") from err
        except Exception as err:  # noqa: BLE001 - malformed files raise many kinds of error inside PIL's decoders
            raise ServeError(400, f"{where}: could not decode the image ({type(err).__name__}: {err})",
                             "bad_image") from err
