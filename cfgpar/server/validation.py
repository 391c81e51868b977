"""Checks shared by the image and the video endpoints: prompt, JSON body, size, uploaded pictures.
Each raises ServeError (a 4xx in OpenAI's shape) naming what is wrong."""

from __future__ import annotations

import io
import json
import re

from PIL import Image, UnidentifiedImageError

from cfgpar.params import check_prompt_text
from cfgpar.server.errors import ServeError


def check_prompt(prompt: str) -> None:
    """The one prompt rule (inputs/data.py: the CLI and the offline API apply it too), as a 400."""
    try:
        check_prompt_text(prompt)
    except ValueError as exc:
        raise ServeError(400, str(exc), param="prompt") from None


def parse_json_object(raw: bytes) -> dict:
    """A request body that must be one JSON object. Nesting too deep for the parser is the
    client's mistake like any other malformed body."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"the request body is not valid JSON ({exc}).") from None
    except RecursionError:
        raise ServeError(400, "the request body is nested too deeply to be read as JSON.") from None
    if not isinstance(data, dict):
        raise ServeError(400, f"the request body must be a JSON object, got {type(data).__name__}.")
    return data


def parse_size(size: str | None, unit: int, max_pixels: int) -> tuple[int | None, int | None]:
    """(width, height) from "WxH"; (None, None) for the model's default."""
    if size is None or size.strip().lower() in ("", "auto"):
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", size.lower())
    if not match:
        raise ServeError(400, f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '{8 * unit}x{8 * unit}', got {size!r}.",
                         param="size")
    width, height = int(match[1]), int(match[2])
    check_size(width, height, unit, max_pixels, param="size")
    return width, height


def check_size(width: int, height: int, unit: int, max_pixels: int, *, param: str) -> None:
    """At most `max_pixels` in all (checked first, so that a suggested size is never over it),
    and both sides multiples of the model's unit."""
    if width * height > max_pixels:
        raise ServeError(400, f"size {width}x{height} is {width * height} pixels, over this server's limit of "
                         f"{max_pixels}.", param=param)
    if width < unit or height < unit or width % unit or height % unit:
        example = f"{max(unit, width // unit * unit)}x{max(unit, height // unit * unit)}"
        raise ServeError(400, f"size {width}x{height}: width and height must be multiples of {unit} px for this "
                         f"model, e.g. {example}.", param=param)


def decode_image(data: bytes, max_pixels: int, param: str = "image") -> Image.Image:
    if not data:
        raise ServeError(400, f"{param}: the uploaded file is empty.", param=param)
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ServeError(400, f"{param}: over this server's limit of {max_pixels} pixels.", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServeError(400, f"{param}: the file is not a picture this server can read (PNG, JPEG, WebP, ...).",
                         param=param) from None
    width, height = image.size
    if width * height > max_pixels:  # checked on the header, before decoding the pixels
        raise ServeError(400, f"{param} is {width}x{height} = {width * height} pixels, over this server's limit of "
                         f"{max_pixels}.", param=param)
    try:
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes PIL raise, it is the client's file
        raise ServeError(400, f"{param}: the picture could not be decoded ({exc}).", param=param) from None
