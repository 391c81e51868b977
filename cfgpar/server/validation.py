"""Checks shared by the image and the video endpoints: prompt, size, uploaded pictures, pydantic's
errors in one line. Each raises ServeError (a 4xx in OpenAI's shape) naming what is wrong."""

from __future__ import annotations

import io
import re

from PIL import Image, UnidentifiedImageError

from cfgpar.server.errors import ServeError

MAX_PROMPT_CHARS = 10_000


def check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise ServeError(400, "prompt must not be empty.", param="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ServeError(400, f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS}.", param="prompt")


def validation_message(errors) -> tuple[str, str | None]:
    """One line for the first problem, and the parameter it is about."""
    error = errors[0]
    loc = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if error["type"] == "missing":
        return f"{param} is required.", param
    if error["type"] == "extra_forbidden":
        return f"unknown parameter {param!r}.", param
    if error["type"] == "json_invalid":
        return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', error['msg'])}).", None
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return (f"{param}: {error['msg']}, got {got}." if param else f"{error['msg']}."), param


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
    """Both sides multiples of the model's unit, and at most `max_pixels` in all."""
    if width < unit or height < unit or width % unit or height % unit:
        example = f"{max(unit, width // unit * unit)}x{max(unit, height // unit * unit)}"
        raise ServeError(400, f"size {width}x{height}: width and height must be multiples of {unit} px for this "
                         f"model, e.g. {example}.", param=param)
    if width * height > max_pixels:
        raise ServeError(400, f"size {width}x{height} is {width * height} pixels, over this server's limit of "
                         f"{max_pixels}.", param=param)


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
