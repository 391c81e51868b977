"""MP4 files from PIL frames and back, with PyAV (FFmpeg's libraries, bundled in its wheels)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from PIL import Image


def mp4_bytes(frames: Sequence[Image.Image], fps: int, *, crf: int = 18) -> bytes:
    """H.264 (yuv420p, constant quality `crf`) in an MP4 container. H.264 with 4:2:0 chroma needs
    even sides: an odd width or height is padded by one pixel (the last row/column repeated)."""
    import av

    if not frames:
        raise ValueError("a video needs at least one frame.")
    width, height = frames[0].size
    even = (width + width % 2, height + height % 2)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = even
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            image = frame.convert("RGB")
            if image.size != even:
                padded = Image.new("RGB", even)
                padded.paste(image.resize(even, Image.NEAREST))
                padded.paste(image)
                image = padded
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())
    return buffer.getvalue()


def write_mp4(frames: Sequence[Image.Image], path: str | Path, fps: int) -> Path:
    path = Path(path)
    path.write_bytes(mp4_bytes(frames, fps))
    return path


def read_mp4(source: str | Path | bytes) -> tuple[list[Image.Image], float]:
    """The frames of an MP4 (a path or its bytes) as RGB PIL images, and its frame rate."""
    import av

    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_image() for frame in container.decode(stream)]
        return frames, float(stream.average_rate or 0)
