"""Request images -> model inputs: decoding under limits, then each pass's own preprocessing.

Any image PIL can read is accepted and converted to the model's channels (``"L"`` for one channel,
``"RGB"`` for three), then run through timm's evaluation transform (resize, centre crop, normalise)
for the data config of each pass it goes into: the preprocessing its tasks were trained with
(:func:`learnable_memory.pass_groups.pass_groups`), as ``learnable-memory predict`` does.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Sequence

import torch
from PIL import Image, UnidentifiedImageError

from .. import data as D
from ..pass_groups import preprocessing_key
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


def check_channels(data_config: dict) -> None:
    """``ValueError`` unless the model takes one or three channels (what PIL's ``"L"``/``"RGB"`` give)."""
    channels = data_config["input_size"][0]
    if channels not in (1, 3):
        raise ValueError(f"the server feeds images as grayscale or RGB, but this model takes {channels} channels")


class Preprocessor:
    """Bytes of one image -> one ``[C, H, W]`` float tensor per preprocessing asked for.

    Args:
        max_pixels: Largest width x height accepted (413 beyond); PIL's own decompression-bomb guard
            (``Image.MAX_IMAGE_PIXELS``) applies as well.
    """

    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels
        self._transforms: dict[str, Callable] = {}  # preprocessing_key -> timm's transform

    def transform(self, data_config: dict) -> Callable:
        """timm's evaluation transform for ``data_config``, built once per preprocessing."""
        key = preprocessing_key(data_config)
        if key not in self._transforms:
            check_channels(data_config)
            self._transforms[key] = D.model_transform(data_config)
        return self._transforms[key]

    def __call__(self, data: bytes, where: str, data_configs: Sequence[dict]) -> list[torch.Tensor]:
        """Decode once, then preprocess for each of ``data_configs``; ``where`` names the image in error
        messages (e.g. ``"image 2 (cat.png)"``)."""
        image = self.decode(data, where, D.pil_mode(data_configs[0]))
        return [self.transform(c)(image) for c in data_configs]

    def decode(self, data: bytes, where: str, mode: str) -> Image.Image:
        """The image in PIL mode ``mode`` (the model's channels): 413 for too many pixels, 400 for bytes PIL
        can not read."""
        if not data:
            raise ServeError(400, f"{where}: empty file", "bad_image")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > self.max_pixels:
                    raise ServeError(413, f"{where}: {width}x{height} = {width * height} pixels, more than the "
                                     f"{self.max_pixels} allowed per image; send a smaller image", "too_large")
                return img.convert(mode)
        except ServeError:
            raise
        except Image.DecompressionBombError as err:
            raise ServeError(413, f"{where}: {err}", "too_large") from err
        except UnidentifiedImageError as err:
            raise ServeError(400, f"{where}: not an image format PIL can read", "bad_image") from err
        except Exception as err:  # noqa: BLE001 - malformed files raise many kinds of error inside PIL's decoders
            raise ServeError(400, f"{where}: could not decode the image ({type(err).__name__}: {err})",
                             "bad_image") from err
