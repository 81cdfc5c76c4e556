"""``drive.mount(path)``: Colab asks the user for access and mounts Drive at ``path``.

Here the Drive's files live in ``$FAKE_COLAB_DRIVE_STORE`` while unmounted (a new runtime starts that way) and are
moved to ``path/MyDrive`` by ``mount``, so paths are the same in every runtime, as in Colab. Every call is appended
to ``$FAKE_COLAB_LOG`` (when set), so a test can count mounts.
"""

import os
from pathlib import Path


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    target = Path(mountpoint, "MyDrive")
    store = os.environ.get("FAKE_COLAB_DRIVE_STORE")
    if store and Path(store).is_dir() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        Path(store).rename(target)
    target.mkdir(parents=True, exist_ok=True)
    if os.environ.get("FAKE_COLAB_LOG"):
        with open(os.environ["FAKE_COLAB_LOG"], "a", encoding="utf-8") as log:
            log.write(f"mount {mountpoint}\n")
