"""Which captions lycolab wrote and which a person changed: a small manifest of what lycolab last wrote.

``<root>/.lycolab-captions.json`` maps each caption file (its path relative to ``root``, POSIX style) to the SHA-256
of the text lycolab last wrote there, whitespace at the ends ignored. A caption whose file still hashes to its entry
is lycolab's own, so re-tagging may replace it; any other existing caption — changed since (the caption editor, tag
tools, a text editor) or there before lycolab ever wrote it — is the user's, and only ``overwrite_all`` replaces it.
Writes that count as the user's (the caption editor, :func:`lycolab.steps.annotate.edit_tags`) drop the entry, so
a caption stays the user's even if its text happens to come back to what lycolab wrote.

Why beside the captions (``train_data/``) and not in ``config/``: the record travels with the captions it describes
(Drive copies, the CLI on any folder), and it can never be taken for training data — image scans take only image
extensions (``lycolab.data.scan``), the dataset doctor ignores dot-files and step 03 copies none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from lycolab.files import atomic_write

logger = logging.getLogger(__name__)

MANIFEST_NAME = ".lycolab-captions.json"
_VERSION = 1


def caption_digest(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def read_caption_text(path: Path) -> str:
    """A caption file's text as lycolab reads it (a byte-order mark dropped, invalid UTF-8 replaced), stripped."""
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


class CaptionManifest:
    """The record for every caption file under ``root``; :meth:`save` writes it (atomically) when it changed."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / MANIFEST_NAME
        self.digests: dict[str, str] = self._load()
        self._changed = False

    @classmethod
    def for_folder(cls, folder: str | Path) -> CaptionManifest:
        """The manifest of the nearest folder at or above ``folder`` that has one (a workspace's ``train_data/``
        when tagging one of its subfolders from the command line), else a new one for ``folder``."""
        folder = Path(folder).resolve()
        for candidate in (folder, *folder.parents):
            if (candidate / MANIFEST_NAME).is_file():
                return cls(candidate)
        return cls(folder)

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("%s: unreadable (%s); every existing caption counts as edited by hand", self.path, error)
            return {}
        captions = data.get("captions", {}) if isinstance(data, dict) else {}
        return {str(key): str(value) for key, value in captions.items()} if isinstance(captions, dict) else {}

    def key(self, caption: Path) -> str:
        return Path(os.path.relpath(Path(caption).resolve(), self.root.resolve())).as_posix()

    def written_by_lycolab(self, caption: Path) -> bool:
        """True when the file exists and still holds exactly what lycolab last wrote there."""
        recorded = self.digests.get(self.key(caption))
        if recorded is None or not caption.is_file():
            return False
        try:
            return caption_digest(read_caption_text(caption)) == recorded
        except OSError:
            return False

    def is_users(self, caption: Path) -> bool:
        """An existing caption that lycolab did not write as it is now: edited, or made by hand."""
        return caption.is_file() and not self.written_by_lycolab(caption)

    def record(self, caption: Path, text: str) -> None:
        digest = caption_digest(text)
        if self.digests.get(self.key(caption)) != digest:
            self.digests[self.key(caption)] = digest
            self._changed = True

    def forget(self, caption: Path) -> None:
        if self.digests.pop(self.key(caption), None) is not None:
            self._changed = True

    def save(self) -> None:
        if not self._changed:
            return
        text = json.dumps({"version": _VERSION, "captions": dict(sorted(self.digests.items()))}, indent=1)
        atomic_write(self.path, lambda temporary: temporary.write_text(text + "\n", encoding="utf-8"))
        self._changed = False


def write_caption(path: Path, text: str, manifest: CaptionManifest | None, by_lycolab: bool) -> Path:
    """Write one caption atomically and note who it belongs to: lycolab's text is recorded, the user's is not.

    The caption is written before the manifest learns of it, so a crash in between leaves it counted as the
    user's — kept by a later overwrite, never lost.
    """
    text = text.strip()
    atomic_write(path, lambda temporary: temporary.write_text(text + "\n", encoding="utf-8"))
    if manifest is not None:
        if by_lycolab:
            manifest.record(path, text)
        else:
            manifest.forget(path)
    return path
