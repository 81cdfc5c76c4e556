"""``files.upload()``: the user picks files in the browser; Colab saves them in the working folder and returns
``{name: bytes}``. Here the picked files are the paths in ``$FAKE_COLAB_UPLOAD`` (separated by ``os.pathsep``)."""

import os
from pathlib import Path


def upload():
    picked = {}
    for path in filter(None, os.environ.get("FAKE_COLAB_UPLOAD", "").split(os.pathsep)):
        data = Path(path).read_bytes()
        Path(Path(path).name).write_bytes(data)
        picked[Path(path).name] = data
    return picked
