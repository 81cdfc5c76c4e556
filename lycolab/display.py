"""What the notebooks show: tables and image galleries that render as HTML in Jupyter/Colab and as text elsewhere,
and errors that print as one line instead of a traceback.

Objects here have ``_repr_html_`` (the notebook) and ``__str__`` (a terminal or a saved log), so a notebook's display
cell is just the name of the object a step returned.
"""

from __future__ import annotations

import base64
import functools
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

Function = TypeVar("Function", bound=Callable[..., Any])


class NotebookError(Exception):
    """A mistake the user can fix; IPython shows it as one line (``_render_traceback_``), not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"\033[31merror:\033[0m {self}"]


def one_line_errors(function: Function) -> Function:
    """Turn the errors lycolab raises for bad input into NotebookError, so a notebook cell fails in one line."""
    from lycolab.errors import user_errors

    expected = user_errors()

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except NotebookError:
            raise
        except expected as error:
            raise NotebookError(str(error)) from None

    return wrapper  # type: ignore[return-value]


@dataclass
class Table:
    """Rows of dicts with a title; HTML in a notebook, aligned text elsewhere."""

    rows: list[dict[str, Any]]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def columns(self) -> list[str]:
        names: list[str] = []
        for row in self.rows:
            names += [key for key in row if key not in names]
        return names

    def __str__(self) -> str:
        columns = self.columns()
        cells = [[str(row.get(column, "")) for column in columns] for row in self.rows]
        widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
        lines = [self.title] if self.title else []
        lines.append("  ".join(column.ljust(width) for column, width in zip(columns, widths, strict=True)))
        lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in cells]
        return "\n".join(lines + self.notes)

    def _repr_html_(self) -> str:
        columns = self.columns()
        head = "".join(f"<th>{html.escape(column)}</th>" for column in columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(column, '')))}</td>" for column in columns)
                       + "</tr>" for row in self.rows)
        title = f"<b>{html.escape(self.title)}</b>" if self.title else ""
        notes = "".join(f"<div>{html.escape(note)}</div>" for note in self.notes)
        return f"{title}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


class ShownAsTable:
    """For step results: define ``table()`` and the notebook and the terminal both show it."""

    def table(self) -> Table:
        raise NotImplementedError

    def _repr_html_(self) -> str:
        return self.table()._repr_html_()

    def __str__(self) -> str:
        return str(self.table())


def thumbnail_data_uri(path: Path, size: int = 256) -> str:
    """A small JPEG of an image as a data URI, so a notebook shows it without serving files."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Gallery:
    """Images with a caption under each; HTML thumbnails in a notebook, file names and captions elsewhere."""

    images: Sequence[Path]
    captions: Sequence[str]
    title: str = ""

    def __str__(self) -> str:
        lines = [self.title] if self.title else []
        return "\n".join(lines + [f"{Path(path).name}: {caption}"
                                  for path, caption in zip(self.images, self.captions, strict=True)])

    def _repr_html_(self) -> str:
        cards = "".join(
            f'<figure style="display:inline-block;width:220px;margin:4px;vertical-align:top">'
            f'<img src="{thumbnail_data_uri(Path(path))}" style="max-width:220px;max-height:220px"/>'
            f'<figcaption style="font-size:12px">{html.escape(caption)}</figcaption></figure>'
            for path, caption in zip(self.images, self.captions, strict=True))
        title = f"<b>{html.escape(self.title)}</b><br/>" if self.title else ""
        return f"{title}<div>{cards}</div>"


@dataclass
class Picture:
    """One image file (a grid, a plot) shown inline, or its path as text."""

    path: Path
    title: str = ""

    def __str__(self) -> str:
        return f"{self.title}: {self.path}" if self.title else str(self.path)

    def _repr_html_(self) -> str:
        data = base64.b64encode(Path(self.path).read_bytes()).decode()
        title = f"<b>{html.escape(self.title)}</b><br/>" if self.title else ""
        return f'{title}<img src="data:image/png;base64,{data}" style="max-width:100%"/>'
