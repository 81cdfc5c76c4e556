"""Training images and their tags from image boards, by tag search — what the old kohya-trainer and
hollowstrawberry notebooks offered as "booru download by tags with limits".

Three sites, two API families:

- ``danbooru``: ``GET {base}/posts.json?tags=…&limit=…&page=N`` (pages from 1) answers a list of posts whose tags come
  split by category (``tag_string_character``, ``_copyright``, ``_general``, ``_artist``, ``_meta``). Anonymous
  searches may hold at most 2 tags; metatags such as ``rating:`` and ``score:`` do not count (danbooru's
  ``PostQuery::UNLIMITED_METATAGS``). ``DANBOORU_LOGIN`` and ``DANBOORU_API_KEY`` lift that.
- ``gelbooru`` and ``safebooru`` (Gelbooru's DAPI): ``GET {base}/index.php?page=dapi&s=post&q=index&json=1&tags=…
  &limit=…&pid=N`` (pages from 0). Gelbooru answers ``{"@attributes": …, "post": [...]}`` (no ``post`` key past the
  last page, a single object for a single post), safebooru a plain list (an empty body past the last page). Tags are
  one space-separated string with no categories, so artist tags cannot be told apart there. Gelbooru may ask for
  ``GELBOORU_API_KEY`` and ``GELBOORU_USER_ID``; safebooru's posts may lack ``file_url``, which its site builds as
  ``{base}/images/{directory}/{image}``.

Each image is saved as ``{site}_{id}.{ext}``, checked to decode before it is written (atomically) and given a caption
file of its tags, as WD14/kohya captions are: comma-separated, underscores as spaces (but not in emoticons of three
characters or fewer such as ``^_^``, as the Dataset Maker notebook did), parentheses kept as they are. An image already
in the folder is neither downloaded again nor has its caption rewritten (it may have been edited), so a re-run resumes.
Credentials come from the environment or Colab's secrets panel and are sent only as query parameters: never logged,
shown in a URL, put in an error message or written to a file.
"""

from __future__ import annotations

import html
import http.client
import io
import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from lycolab.data.scan import IMAGE_EXTENSIONS, caption_suffix
from lycolab.display import ShownAsTable, Table
from lycolab.files import atomic_write

logger = logging.getLogger(__name__)

RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
# what each site writes in a post's ``rating``, as the one-letter rating; safebooru's "safe" is its all-ages rating
_POST_RATINGS = {"g": "g", "general": "g", "safe": "g", "s": "s", "sensitive": "s", "q": "q", "questionable": "q",
                 "e": "e", "explicit": "e"}
# danbooru metatags that do not count against its tag limit (app/logical/post_query.rb, UNLIMITED_METATAGS)
_FREE_METATAGS = frozenset(
    "status rating limit is id date age filesize filetype parent child md5 width height duration mpixels ratio score "
    "upvote downvotes favcount embedded tagcount pixiv_id pixiv".split())
ANONYMOUS_TAG_LIMIT = 2
_EMOTICON_LENGTH = 3  # "^_^", "o_o", ">_<" keep their underscores
_MAX_PAGES = 1000  # danbooru refuses anonymous page numbers past 1000; no search needs more to fill a limit


class BooruError(ValueError):
    """The site could not be asked or answered nonsense; one line naming the site and the URL (never credentials)."""


@dataclass(frozen=True)
class Site:
    """One image board: where it is, how its API pages, and which secrets log in to it."""

    name: str
    base_url: str
    api: str  # "danbooru" or "gelbooru" (the DAPI)
    page_size: int  # the most posts one request may ask for
    first_page: int
    credentials: tuple[tuple[str, str], ...] = ()  # (secret name, query parameter)
    server_side_filters: bool = True  # rating: and score: metatags go into the query (always re-checked here)


SITES = {
    "danbooru": Site("danbooru", "https://danbooru.donmai.us", "danbooru", 200, 1,
                     (("DANBOORU_LOGIN", "login"), ("DANBOORU_API_KEY", "api_key"))),
    "gelbooru": Site("gelbooru", "https://gelbooru.com", "gelbooru", 100, 0,
                     (("GELBOORU_USER_ID", "user_id"), ("GELBOORU_API_KEY", "api_key"))),
    "safebooru": Site("safebooru", "https://safebooru.org", "gelbooru", 100, 0, server_side_filters=False),
}


@dataclass
class Post:
    """What lycolab needs of one post, whichever site it came from."""

    id: str
    file_url: str | None
    extension: str  # lower case, without the dot; "" when unknown
    rating: str  # one of RATINGS' letters; "" when unknown
    score: int | None
    tags: list[str]  # caption order, as the site spells them (underscores)


@dataclass
class BooruResult(ShownAsTable):
    folder: Path
    added: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    already_present: list[Path] = field(default_factory=list)

    def table(self) -> Table:
        images = [path for path in self.added if path.suffix.lower() in IMAGE_EXTENSIONS]
        notes = [f"skipped: {item}" for item in self.skipped[:20]]
        if len(self.skipped) > 20:
            notes.append(f"… and {len(self.skipped) - 20} more skipped")
        return Table([{"folder": str(self.folder), "images added": len(images),
                       "caption files added": len(self.added) - len(images),
                       "images already there": len(self.already_present), "posts skipped": len(self.skipped)}],
                      title="booru download", notes=notes)


def download_booru(tags: str, destination: str | Path, limit: int = 100, site: str = "danbooru",
                   base_url: str | None = None, caption_extension: str = ".txt", write_tags: bool = True,
                   min_score: int | None = None, ratings: str = "", timeout: float = 30.0, progress: bool = True,
                   page_size: int | None = None) -> BooruResult:
    """Save up to ``limit`` images matching the tag search ``tags`` (the site's own syntax) into ``destination``,
    each with a caption file of its tags, and say what was added and what was skipped and why.

    Images already in the folder count towards ``limit`` and are not fetched again, so a re-run resumes and a larger
    ``limit`` tops the folder up. ``ratings`` is a comma list of ``g,s,q,e`` or their words; with ``min_score`` it
    goes into the query where the site's metatags allow (danbooru, gelbooru) and is always re-checked on each post
    (safebooru is filtered here only). ``page_size`` is how many posts one API request asks for (the site's maximum
    by default). Bad arguments and failures to ask the site raise one-line :class:`BooruError`/ValueError; a post
    that cannot be used (a video, deleted, undecodable, …) is skipped and reported, never fatal.
    """
    board = _site(site, base_url)
    if limit < 1:
        raise ValueError(f"limit must be at least 1 (got {limit})")
    wanted = parse_ratings(ratings)
    credentials = _credentials(board)
    _check_tag_limit(board, tags, credentials)
    query = _query(board, tags, wanted, min_score)
    folder = Path(destination).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    result = BooruResult(folder)
    size = min(page_size or board.page_size, board.page_size)
    suffix = caption_suffix(caption_extension)
    saved = 0
    bar = _progress_bar(limit, board.name, progress)
    try:
        for post in _posts(board, query, size, credentials, timeout):
            if _save(board, post, folder, suffix, write_tags, wanted, min_score, timeout, result):
                saved += 1
                bar.update(1)
                if saved >= limit:
                    break  # before the next post, which could mean asking the site for another page
    finally:
        bar.close()
    logger.info("%s: %d image(s) added to %s, %d already there, %d post(s) skipped", board.name,
                len([path for path in result.added if path.suffix.lower() in IMAGE_EXTENSIONS]), folder,
                len(result.already_present), len(result.skipped))
    return result


def parse_ratings(ratings: str) -> set[str]:
    """``"g,s"`` or ``"general, sensitive"`` → ``{"g", "s"}``; empty means every rating."""
    letters = set()
    words = {word: letter for letter, word in RATINGS.items()}
    for item in ratings.replace(" ", ",").split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item not in RATINGS and item not in words:
            raise ValueError(f"ratings: {item!r} is not a rating; give a comma list of g,s,q,e "
                             "(general, sensitive, questionable, explicit)")
        letters.add(words.get(item, item))
    return letters


def caption_tags(tags: list[str]) -> str:
    """Booru tags as a kohya/WD14 caption: comma-separated, underscores as spaces except in short emoticons."""
    seen: dict[str, None] = {}
    for tag in tags:
        text = tag if len(tag) <= _EMOTICON_LENGTH else tag.replace("_", " ")
        seen.setdefault(text, None)
    return ", ".join(seen)


def _site(name: str, base_url: str | None) -> Site:
    key = name.strip().lower()
    if key not in SITES:
        raise ValueError(f"site must be one of {', '.join(SITES)} (got {name!r})")
    board = SITES[key]
    if base_url:
        board = Site(board.name, base_url.rstrip("/"), board.api, board.page_size, board.first_page,
                     board.credentials, board.server_side_filters)
    return board


def _credentials(board: Site) -> dict[str, str]:
    """The site's query parameters for logging in, when every secret it needs is set; else none."""
    from lycolab.colab import secret

    values = {parameter: secret(name) or "" for name, parameter in board.credentials}
    return values if values and all(values.values()) else {}


def _check_tag_limit(board: Site, tags: str, credentials: dict[str, str]) -> None:
    if board.api != "danbooru" or credentials:
        return
    counted = [term for term in tags.split() if not _is_free_metatag(term)]
    if len(counted) > ANONYMOUS_TAG_LIMIT:
        raise ValueError(f"danbooru allows at most {ANONYMOUS_TAG_LIMIT} tags in a search without an account (got "
                         f"{len(counted)}: {' '.join(counted)}); use fewer tags, or set DANBOORU_LOGIN and "
                         "DANBOORU_API_KEY (environment or Colab secrets)")


def _is_free_metatag(term: str) -> bool:
    name, separator, _ = term.lstrip("-~").partition(":")
    return bool(separator) and name.lower() in _FREE_METATAGS


def _query(board: Site, tags: str, wanted: set[str], min_score: int | None) -> str:
    """The tag search as sent: the user's tags plus the rating and score metatags the site understands."""
    terms = tags.split()
    if board.server_side_filters and wanted:
        if board.api == "danbooru":
            terms.append("rating:" + ",".join(sorted(wanted, key="gsqe".index)))
        else:  # gelbooru has no rating list; leaving out the others works for any choice
            terms += [f"-rating:{RATINGS[letter]}" for letter in RATINGS if letter not in wanted]
    if board.server_side_filters and min_score is not None:
        terms.append(f"score:>={min_score}")
    return " ".join(terms)


def _progress_bar(total: int, name: str, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{name} images", unit="image")


class _NoProgress:
    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _posts(board: Site, query: str, size: int, credentials: dict[str, str], timeout: float) -> Iterator[Post]:
    """Every post of the search, page after page, until the site has no more; a post seen twice is given once."""
    seen: set[str] = set()
    for page in range(board.first_page, board.first_page + _MAX_PAGES):
        if board.api == "danbooru":
            path, params = "/posts.json", {"tags": query, "limit": size, "page": page}
        else:
            path, params = "/index.php", {"page": "dapi", "s": "post", "q": "index", "json": 1, "tags": query,
                                          "limit": size, "pid": page}
        raw_posts = _api_page(board, path, params, credentials, timeout)
        if not raw_posts:
            return
        for raw in raw_posts:
            post = _danbooru_post(raw, board) if board.api == "danbooru" else _gelbooru_post(raw, board)
            if post.id not in seen:
                seen.add(post.id)
                yield post


def _api_page(board: Site, path: str, params: dict[str, Any], credentials: dict[str, str],
              timeout: float) -> list[dict]:
    shown = f"{board.base_url}{path}?{urllib.parse.urlencode(params)}"  # never with the credentials
    try:
        body = _fetch(board, f"{board.base_url}{path}?{urllib.parse.urlencode({**params, **credentials})}", shown,
                      timeout)
    except BooruError as error:  # the site's own words are quoted: make sure they do not echo a secret back
        raise BooruError(_without(str(error), credentials.values())) from None
    if board.api == "gelbooru" and not body.strip():
        return []  # the DAPI answers nothing at all past the last page
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        start = body[:60].decode("utf-8", "replace").split("\n")[0]
        raise BooruError(f"{board.name}: the answer from {shown} is not JSON (it starts {start!r}); the site may be "
                         "down or refusing scripts, try again later") from None
    return _post_list(board, payload, shown)


def _post_list(board: Site, payload: Any, shown: str) -> list[dict]:
    if isinstance(payload, dict) and board.api == "gelbooru":
        if "post" not in payload and "success" not in payload:
            return []  # gelbooru past the last page: only "@attributes"
        payload = payload.get("post", payload)
        payload = [payload] if isinstance(payload, dict) and "id" in payload else payload
    if isinstance(payload, list) and all(isinstance(item, dict) for item in payload):
        return payload
    message = _site_message(payload)
    raise BooruError(f"{board.name}: unexpected answer from {shown}{': ' + message if message else ''}")


def _fetch(board: Site, url: str, shown: str, timeout: float) -> bytes:
    """The body at ``url``; failures as one-line :class:`BooruError` naming ``shown`` (``url`` may hold secrets)."""
    try:
        return _get(url, timeout)
    except urllib.error.HTTPError as error:
        message = _site_message(_json_or_none(error))
        raise BooruError(f"{board.name}: HTTP {error.code} from {shown}{': ' + message if message else ''}"
                         f"{_login_hint(board, error.code)}") from None
    except (OSError, http.client.HTTPException) as error:  # URLError, timeouts, refused or dropped connections
        raise BooruError(f"{board.name}: cannot reach {shown} ({_failure(error)}); check the connection and the "
                         "base URL, and try again") from None


def _get(url: str, timeout: float) -> bytes:
    from lycolab.cli import version

    headers = {"User-Agent": f"lycolab/{version()} (+https://github.com/lycolab/lycolab)"}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        return response.read()


def _failure(error: Exception) -> str:
    """A failed request in a few words: ``HTTP 404`` or the connection's own reason."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code}"
    return _one_line(str(getattr(error, "reason", None) or error)) or type(error).__name__


def _json_or_none(error: urllib.error.HTTPError) -> Any:
    try:
        return json.loads(error.read() or b"null")
    except (OSError, ValueError):
        return None


def _site_message(payload: Any) -> str:
    """The short reason a booru gives in its JSON errors (``{"success": false, "message": …}``)."""
    if isinstance(payload, dict):
        for key in ("message", "reason", "error"):
            if isinstance(payload.get(key), str) and payload[key].strip():
                return _one_line(payload[key])[:200]
    return ""


def _login_hint(board: Site, code: int) -> str:
    if code in (401, 403) and board.credentials:
        names = " and ".join(name for name, _ in board.credentials)
        return f" (set {names}, or check them)"
    return ""


def _without(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _danbooru_post(raw: dict, board: Site) -> Post:
    tags = [tag for key in ("tag_string_character", "tag_string_copyright", "tag_string_general")
            for tag in str(raw.get(key) or "").split()]
    if raw.get("file_url"):
        url, extension = raw["file_url"], str(raw.get("file_ext") or _extension(raw["file_url"]))
    else:  # the sample, when only it is offered: its own format, whatever the original's
        url, extension = raw.get("large_file_url"), _extension(raw.get("large_file_url"))
    return Post(_post_id(raw), _absolute(board, url), extension.lower(), _POST_RATINGS.get(str(raw.get("rating")), ""),
                _integer(raw.get("score")), tags)


def _gelbooru_post(raw: dict, board: Site) -> Post:
    url = raw.get("file_url")
    if not url and raw.get("directory") and raw.get("image"):
        url = f"{board.base_url}/images/{raw['directory']}/{raw['image']}"  # how safebooru's own pages link it
    extension = _extension(url) or _extension(raw.get("image"))
    tags = [html.unescape(tag) for tag in str(raw.get("tags") or "").split()]
    return Post(_post_id(raw), _absolute(board, url), extension, _POST_RATINGS.get(str(raw.get("rating")).lower(), ""),
                _integer(raw.get("score")), tags)


def _post_id(raw: dict) -> str:
    """The post's number as text; "" when there is none (it names a file, so nothing else gets through)."""
    number = _integer(raw.get("id"))
    return str(number) if number is not None and number >= 0 else ""


def _extension(url: Any) -> str:
    if not url:
        return ""
    return PurePosixPath(urllib.parse.urlparse(str(url)).path).suffix.lstrip(".").lower()


def _absolute(board: Site, url: Any) -> str | None:
    return urllib.parse.urljoin(board.base_url + "/", str(url)) if url else None


def _integer(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _save(board: Site, post: Post, folder: Path, caption_extension: str, write_tags: bool, wanted: set[str],
          min_score: int | None, timeout: float, result: BooruResult) -> bool:
    """Bring one post's image (and caption) into ``folder``; True when the image is there afterwards."""
    name = f"{board.name}_{post.id}" if post.id else f"a {board.name} post"
    reason = _unusable(post, wanted, min_score)
    if reason:
        result.skipped.append(f"{name} ({reason})")
        return False
    image_path = folder / f"{name}.{post.extension}"
    caption_path = folder / f"{name}{caption_extension}"
    if image_path.exists():
        result.already_present.append(image_path)
    else:
        try:
            data = _get(post.file_url or "", timeout)
        except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError: a URL urllib cannot open
            result.skipped.append(f"{image_path.name} (download failed: {_failure(error)})")
            return False
        problem = _undecodable(data)
        if problem:
            result.skipped.append(f"{image_path.name} (does not decode: {problem})")
            return False
        result.added.append(atomic_write(image_path, lambda temporary: temporary.write_bytes(data)))
    if write_tags and not caption_path.exists():
        caption = caption_tags(post.tags) + "\n"
        result.added.append(atomic_write(caption_path, lambda temporary: temporary.write_text(caption, "utf-8")))
    return True


def _unusable(post: Post, wanted: set[str], min_score: int | None) -> str:
    """Why a post cannot become a training image, or "" when it can."""
    if not post.id:
        return "no post id"
    if not post.file_url:
        return "no file URL: deleted, banned, or only shown to accounts"
    if f".{post.extension}" not in IMAGE_EXTENSIONS:
        kind = "ugoira animation" if post.extension == "zip" else post.extension or "unknown file type"
        return f"{kind} is not an image lycolab trains on ({', '.join(IMAGE_EXTENSIONS)})"
    if wanted and post.rating not in wanted:
        return f"rating {RATINGS.get(post.rating, 'unknown')} is not in {','.join(sorted(wanted, key='gsqe'.index))}"
    if min_score is not None and (post.score or 0) < min_score:
        return f"score {post.score if post.score is not None else 'unknown'} is below {min_score}"
    return ""


def _undecodable(data: bytes) -> str:
    """Why ``data`` is not a usable image, or "" when every pixel decodes."""
    from PIL import Image, UnidentifiedImageError

    from lycolab.data.images import MAX_IMAGE_PIXELS

    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return f"{width}x{height} is larger than {MAX_IMAGE_PIXELS // 1_000_000} megapixels"
            image.load()
    except UnidentifiedImageError:
        return "not an image file, or a format PIL cannot decode"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        return _one_line(str(error)) or type(error).__name__
    return ""
