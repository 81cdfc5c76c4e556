"""Install lycolab into this runtime when it is missing or at another version: the first code cell of every notebook.

Each "Open in Colab" notebook starts in a runtime of its own, and a disconnect gives a new one, so every notebook must
be able to install lycolab by itself. This module uses only the standard library because it runs before lycolab can
be imported: ``scripts/build_notebooks.py`` copies its source into each notebook's install cell.

What to install is one form field, ``lycolab_source``:

- a release (``0.1.0``; empty means the version the notebook was built from), installed from its git tag ``v0.1.0``;
- a branch or tag name (``main``), or a ``git+https://…`` URL;
- a wheel (``….whl``) or a source folder, e.g. on Drive.

Colab's torch is never touched: the torch, torchvision, torchaudio and xformers already installed are pinned for the
install, so pip can only keep them. When the wanted lycolab is already in place the check reads two small metadata
files and returns in milliseconds.
"""

import importlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

BUILT_VERSION = "0.1.0"  # scripts/build_notebooks.py writes pyproject.toml's version here (the lint checks it)
REPOSITORY = "https://github.com/lycolab/lycolab"
PINNED = ("torch", "torchvision", "torchaudio", "xformers")
RELEASE = re.compile(r"^v?\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?$")
DRIVE_MOUNT = Path(os.environ.get("LYCOLAB_DRIVE_MOUNT", "/content/drive"))  # as lycolab.colab


class InstallError(RuntimeError):
    """Shown by IPython as one line instead of a traceback."""

    def _render_traceback_(self):
        return [f"\033[31merror:\033[0m {self}"]


def wanted(source):
    """(kind, what pip installs, the version or source that must be installed): kind is release, git, wheel or
    folder."""
    source = (source or "").strip() or BUILT_VERSION
    if RELEASE.match(source):
        version = source.lstrip("v")
        return "release", f"git+{REPOSITORY}@v{version}", version
    if source.startswith(("git+", "http://", "https://")):
        kind = "wheel" if source.endswith(".whl") else "git"
        return kind, source if kind == "wheel" or source.startswith("git+") else f"git+{source}", source
    path = Path(source).expanduser()
    _mount_drive_for(path)
    if source.endswith(".whl") or path.is_file():
        return "wheel", path.resolve().as_uri(), path.resolve().as_uri()
    if path.is_dir() or source.startswith(("/", "~", ".")):
        if not (path / "pyproject.toml").is_file():
            raise InstallError(f"{path}: not a lycolab source folder (no pyproject.toml there); give the folder "
                               "that holds pyproject.toml, a .whl file, a release like 0.1.0 or a branch name")
        return "folder", path.resolve().as_uri(), path.resolve().as_uri()
    return "git", f"git+{REPOSITORY}@{source}", f"git+{REPOSITORY}@{source}"


def _mount_drive_for(path):
    """A wheel or folder on Drive in a new Colab runtime: Drive is not mounted yet (the workspace mounts it later)."""
    if path.is_absolute() and path.is_relative_to(DRIVE_MOUNT) and not (DRIVE_MOUNT / "MyDrive").is_dir():
        try:
            from google.colab import drive
        except ImportError:
            return
        drive.mount(str(DRIVE_MOUNT))


def installed():
    """(version, the URL it was installed from or None, the git revision asked for or None); None if missing."""
    try:
        distribution = importlib.metadata.distribution("lycolab")
    except importlib.metadata.PackageNotFoundError:
        return None
    direct = json.loads(distribution.read_text("direct_url.json") or "{}")
    url, revision = direct.get("url"), direct.get("vcs_info", {}).get("requested_revision")
    if "vcs_info" in direct:
        url = f"git+{url}@{revision}" if revision else f"git+{url}"
    return distribution.version, url, revision


def in_place(kind, target, present):
    """Whether the lycolab installed (``present``, from :func:`installed`) is the one ``target`` names."""
    if present is None:
        return False
    version, url, _revision = present
    if kind == "release":
        return version == target
    return url == target


def _pins(folder):
    """A constraints file holding the installed torch & co at their exact versions, so pip never replaces them."""
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    path = Path(folder) / "pins.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _constraints(kind, source):
    """requirements-colab.txt of the same source: tested floors and ceilings (a folder's own copy, or the tag's)."""
    if kind == "folder":
        local = Path(urllib.parse.urlparse(source).path) / "requirements-colab.txt"
        return [str(local)] if local.is_file() else []
    match = re.match(r"^git\+https://github\.com/([^/@]+/[^/@]+?)(?:\.git)?@(.+)$", source)
    if match:
        return [f"https://raw.githubusercontent.com/{match.group(1)}/{match.group(2)}/requirements-colab.txt"]
    return []


def install_command(kind, source, folder):
    """The pip command line: lycolab with the notebook extras (and bitsandbytes where there is an NVIDIA GPU)."""
    extras = "notebook,tensorboard" + (",gpu" if shutil.which("nvidia-smi") else "")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "-c", str(_pins(folder))]
    for constraints in _constraints(kind, source):
        command += ["-c", constraints]
    return command + [f"lycolab[{extras}] @ {source}"]


def loaded_versions():
    """{distribution: version} for the packages this runtime has already imported (Colab loads numpy, PIL … at
    start): pip replacing one of them cannot take effect until the runtime restarts."""
    try:
        owners = importlib.metadata.packages_distributions()
    except Exception:  # a broken metadata entry must not stop the install
        return {}
    loaded = {name.partition(".")[0] for name in list(sys.modules)}
    versions = {}
    for module in loaded & set(owners):
        for name in owners[module]:
            version = _version_now(name)
            if version is not None:
                versions[name] = version
    return versions


def _run(command, hint=""):
    completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if completed.returncode != 0:
        lines = [line for line in completed.stdout.splitlines() if line.strip()]
        print("\n".join(lines[-15:]))
        reason = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
        raise InstallError(f"pip could not install lycolab: {reason.strip()} (the lines above say more){hint}")


def ensure(source=""):
    """Install the lycolab ``source`` names unless it is already installed (then it returns at once, silently)."""
    kind, target, expected = wanted(source)
    present = installed()
    if in_place(kind, expected, present):
        return
    if "lycolab" in sys.modules:
        raise InstallError(f"lycolab {present[0] if present else ''} is already loaded in this runtime; restart it "
                           "(Runtime → Restart session) and run this cell again to switch to " + (source or expected))
    started = time.monotonic()
    print(f"installing lycolab from {source or expected} (a minute or two; torch stays as it is)…")
    before = loaded_versions()
    if present is not None:
        _run([sys.executable, "-m", "pip", "uninstall", "--quiet", "--yes", "lycolab"])
    with tempfile.TemporaryDirectory() as folder:
        hint = f"; a release is the git tag v{expected} of {REPOSITORY}: check it exists, or set lycolab_source " \
            "to main for the newest code" if kind == "release" else ""
        _run(install_command(kind, target, folder), hint)
    importlib.invalidate_caches()
    present = installed()
    if present is None:
        raise InstallError("pip finished but lycolab is not importable; restart the runtime and run this cell again")
    print(f"lycolab {present[0]} installed in {time.monotonic() - started:.0f} s")
    changed = sorted(name for name, version in before.items() if _version_now(name) not in (version, None))
    if changed:
        raise InstallError(f"pip updated {', '.join(changed)}, already loaded in this runtime: restart it (Runtime → "
                           "Restart session) and run this cell again (it will be quick)")


def _version_now(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
