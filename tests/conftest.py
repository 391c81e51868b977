import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # toy_pipeline, importable by spawned ranks too
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from toy_pipeline import write_toy_model  # noqa: E402


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    return write_toy_model(tmp_path_factory.mktemp("toy"))


def child_pids(parent: int | None = None, *, skip_trackers: bool = True) -> set[int]:
    """Live (non-zombie) children of `parent` (default: this process), without multiprocessing's
    resource tracker unless `skip_trackers` is False."""
    me = str(parent or os.getpid())
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] != me or fields[0] == "Z":
            continue
        if not skip_trackers or b"resource_tracker" not in _cmdline(entry):
            pids.add(int(entry.name))
    return pids


def _cmdline(entry: Path) -> bytes:
    """multiprocessing's resource tracker is started once per interpreter and lives on by design."""
    try:
        return (entry / "cmdline").read_bytes()
    except OSError:
        return b""
