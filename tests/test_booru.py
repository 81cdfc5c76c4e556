"""Booru downloads against a fake image board on 127.0.0.1 that speaks danbooru's API and Gelbooru's DAPI (gelbooru's
and safebooru's answer shapes): paging, what is skipped and why, captions, resuming, filters, the anonymous tag
limit, one-line errors, and credentials that never reach a message, a log or a file."""

from __future__ import annotations

import http.server
import io
import json
import logging
import socket
import threading
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from lycolab.data.booru import BooruError, caption_tags, download_booru, parse_ratings
from lycolab.errors import user_errors

SECRET = "sekrit-KEY-4242"


def image_bytes(format_name: str, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format_name)
    return buffer.getvalue()


PNG = image_bytes("PNG", (200, 40, 40))
JPEG = image_bytes("JPEG", (40, 200, 40))
BROKEN = PNG[: len(PNG) // 2]  # a valid header, then the download stops


def danbooru_post(post_id: int, extension: str, rating: str = "g", score: int = 10, file: bool = True,
                  character: str = "", copyright: str = "", general: str = "", artist: str = "") -> dict:
    post = {"id": post_id, "file_ext": extension, "rating": rating, "score": score, "md5": f"md5{post_id}",
            "tag_string_character": character, "tag_string_copyright": copyright, "tag_string_general": general,
            "tag_string_artist": artist, "tag_string_meta": "highres"}
    if file:
        post["file_url"] = f"/data/{post_id}.{extension}"  # relative, resolved against the base URL
        post["large_file_url"] = f"/data/sample-{post_id}.jpg"
    return post


DANBOORU_POSTS = [
    danbooru_post(101, "png", "g", 12, character="hatsune_miku", copyright="vocaloid",
                  general="1girl solo long_hair ^_^ smile_(expression)", artist="famous_artist"),
    danbooru_post(100, "mp4"),
    danbooru_post(99, "png", file=False),  # deleted or banned: no file URL
    danbooru_post(98, "png"),  # served truncated
    danbooru_post(97, "jpg", "e", 30, general="1boy"),
    danbooru_post(96, "png", "s", 2, general="cat"),
    danbooru_post(95, "zip"),  # ugoira
    danbooru_post(94, "jpg", "q", 8, general="dog"),
    danbooru_post(93, "png", "g", 50, general="sky"),
    danbooru_post(92, "gif"),
]

GELBOORU_POSTS = [
    {"id": 11, "file_url": "/data/g11.jpg", "image": "g11.jpg", "directory": "aa", "md5": "m11", "score": 5,
     "rating": "general", "tags": "1girl blue_hair o_o rock_&amp;_roll"},
    {"id": 10, "file_url": "/data/g10.webm", "image": "g10.webm", "md5": "m10", "score": 5, "rating": "general",
     "tags": "video"},
    {"id": 9, "file_url": "/data/missing.png", "image": "missing.png", "md5": "m9", "score": 5, "rating": "general",
     "tags": "gone"},  # the file answers 404
    {"id": 8, "file_url": "/data/g8.png", "image": "g8.png", "md5": "m8", "score": 1, "rating": "explicit",
     "tags": "nsfw"},
    {"id": 7, "file_url": "/data/g7.png", "image": "g7.png", "md5": "m7", "score": 9, "rating": "sensitive",
     "tags": "swimsuit"},
]

SAFEBOORU_POSTS = [  # safebooru: "hash" instead of md5, file_url sometimes left out, score may be null
    {"id": 31, "directory": "3a", "image": "s31.png", "hash": "h31", "score": None, "rating": "safe",
     "tags": "1girl flower"},
    {"id": 30, "file_url": "/data/s30.jpg", "directory": "3b", "image": "s30.jpg", "hash": "h30", "score": 4,
     "rating": "general", "tags": "landscape"},
    {"id": 29, "directory": "3c", "image": "s29.png", "hash": "h29", "score": 2, "rating": "questionable",
     "tags": "bikini"},
    {"id": "../../escape", "file_url": "/data/s30.jpg", "score": 9, "rating": "safe", "tags": "x"},  # names a file
]

FILES = {"/data/101.png": PNG, "/data/98.png": BROKEN, "/data/97.jpg": JPEG, "/data/96.png": PNG,
         "/data/94.jpg": JPEG, "/data/93.png": PNG, "/data/100.mp4": b"\x00\x00\x00 ftypmp42",
         "/data/92.gif": b"GIF89a", "/data/95.zip": b"PK", "/data/g11.jpg": JPEG, "/data/g10.webm": b"\x1aE\xdf\xa3",
         "/data/g8.png": PNG, "/data/g7.png": PNG, "/safebooru/images/3a/s31.png": PNG, "/data/s30.jpg": JPEG,
         "/safebooru/images/3c/s29.png": PNG}


class FakeBooru:
    """The three sites under /danbooru, /gelbooru and /safebooru, images under /data; every request is recorded."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.errors: dict[str, tuple[int, bytes]] = {}  # path → (status, body) served instead
        self.base = ""

    def url(self, site: str) -> str:
        return f"{self.base}/{site}"

    def api_calls(self, site: str) -> list[dict[str, str]]:
        return [query for path, query in self.requests if path.startswith(f"/{site}/") and "/images/" not in path]

    def file_calls(self) -> list[str]:
        return [path for path, _ in self.requests if path.startswith("/data/") or "/images/" in path]

    def answer(self, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        if path in self.errors:
            return self.errors[path]
        if path in FILES:
            return 200, FILES[path]
        limit = int(query.get("limit", 100))
        if path == "/danbooru/posts.json":
            start = (int(query["page"]) - 1) * limit
            return 200, json.dumps(DANBOORU_POSTS[start:start + limit]).encode()
        if path in ("/gelbooru/index.php", "/safebooru/index.php"):
            assert (query["page"], query["s"], query["q"], query["json"]) == ("dapi", "post", "index", "1")
            start = int(query["pid"]) * limit
            if path.startswith("/safebooru"):
                chunk = SAFEBOORU_POSTS[start:start + limit]
                return 200, json.dumps(chunk).encode() if chunk else b""  # nothing at all past the last page
            chunk = GELBOORU_POSTS[start:start + limit]
            payload: dict = {"@attributes": {"limit": limit, "offset": start, "count": len(GELBOORU_POSTS)}}
            if chunk:
                payload["post"] = chunk[0] if len(chunk) == 1 else chunk  # one post comes as an object
            return 200, json.dumps(payload).encode()
        return 404, b"not found"


@pytest.fixture
def booru(monkeypatch):
    fake = FakeBooru()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            fake.requests.append((url.path, query))
            status, body = fake.answer(url.path, query)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("DANBOORU_LOGIN", "DANBOORU_API_KEY", "GELBOORU_USER_ID", "GELBOORU_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.base = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def danbooru(booru: FakeBooru, folder: Path, tags: str = "1girl solo", **options):
    options = {"limit": 3, "page_size": 4, "progress": False, **options}
    return download_booru(tags, folder, site="danbooru", base_url=booru.url("danbooru"), **options)


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_saves_exactly_limit_images_over_several_pages_and_reports_each_skip(booru, tmp_path):
    result = danbooru(booru, tmp_path)

    assert names(tmp_path) == ["danbooru_101.png", "danbooru_101.txt", "danbooru_96.png", "danbooru_96.txt",
                               "danbooru_97.jpg", "danbooru_97.txt"]  # no .tmp file, no broken image left behind
    assert sorted(path.name for path in result.added) == names(tmp_path)
    assert [call["page"] for call in booru.api_calls("danbooru")] == ["1", "2"]  # stops once the limit is met
    assert all(call["limit"] == "4" for call in booru.api_calls("danbooru"))
    assert [item.split(" (")[0] for item in result.skipped] == ["danbooru_100", "danbooru_99", "danbooru_98.png"]
    assert "mp4 is not an image" in result.skipped[0]
    assert "no file URL" in result.skipped[1]
    assert "does not decode" in result.skipped[2]
    assert "images added" in str(result) and "danbooru_99" in str(result)


def test_caption_puts_character_and_copyright_first_and_leaves_out_artist_and_meta(booru, tmp_path):
    danbooru(booru, tmp_path, limit=1)

    caption = (tmp_path / "danbooru_101.txt").read_text(encoding="utf-8")
    assert caption == "hatsune miku, vocaloid, 1girl, solo, long hair, ^_^, smile (expression)\n"


def test_caption_tags_keep_parentheses_and_short_emoticons_and_drop_repeats():
    assert caption_tags(["o_o", "^_^", "a_b_c", "c.c._(code_geass)", "solo", "solo"]) == \
        "o_o, ^_^, a b c, c.c. (code geass), solo"


def test_rerun_downloads_no_saved_image_again_and_keeps_edited_captions(booru, tmp_path):
    danbooru(booru, tmp_path)
    (tmp_path / "danbooru_101.txt").write_text("my edited caption", encoding="utf-8")
    (tmp_path / "danbooru_96.txt").unlink()
    booru.requests.clear()

    result = danbooru(booru, tmp_path)

    assert booru.file_calls() == ["/data/98.png"]  # only the post that failed last time is tried again
    assert [path.name for path in result.added] == ["danbooru_96.txt"]  # a missing caption is filled in
    assert sorted(path.name for path in result.already_present) == ["danbooru_101.png", "danbooru_96.png",
                                                                    "danbooru_97.jpg"]
    assert (tmp_path / "danbooru_101.txt").read_text(encoding="utf-8") == "my edited caption"


def test_write_tags_false_saves_images_only(booru, tmp_path):
    danbooru(booru, tmp_path, limit=1, write_tags=False)
    assert names(tmp_path) == ["danbooru_101.png"]


def test_ratings_go_into_the_danbooru_query_and_are_checked_on_each_post(booru, tmp_path):
    result = danbooru(booru, tmp_path, limit=10, ratings="general,s")

    assert booru.api_calls("danbooru")[0]["tags"] == "1girl solo rating:g,s"
    assert sorted(path.name for path in result.added if path.suffix != ".txt") == [
        "danbooru_101.png", "danbooru_93.png", "danbooru_96.png"]
    assert "danbooru_97 (rating explicit is not in g,s)" in result.skipped
    assert "danbooru_94 (rating questionable is not in g,s)" in result.skipped
    assert [call["page"] for call in booru.api_calls("danbooru")] == ["1", "2", "3", "4"]  # until an empty page


def test_min_score_goes_into_the_query_and_skips_lower_scores(booru, tmp_path):
    result = danbooru(booru, tmp_path, limit=10, min_score=10)

    assert booru.api_calls("danbooru")[0]["tags"] == "1girl solo score:>=10"
    assert sorted(path.name for path in result.added if path.suffix != ".txt") == [
        "danbooru_101.png", "danbooru_93.png", "danbooru_97.jpg"]
    assert "danbooru_96 (score 2 is below 10)" in result.skipped


def test_danbooru_refuses_more_than_two_tags_without_an_account_before_asking(booru, tmp_path):
    with pytest.raises(ValueError, match="at most 2 tags") as caught:
        danbooru(booru, tmp_path, tags="1girl solo smile")
    assert "\n" not in str(caught.value) and "DANBOORU_API_KEY" in str(caught.value)
    assert booru.requests == []


def test_danbooru_metatags_that_do_not_count_pass_the_tag_limit_and_order_counts(booru, tmp_path):
    with pytest.raises(ValueError, match="got 3: 1girl solo order:score"):
        danbooru(booru, tmp_path, tags="1girl solo order:score")

    result = danbooru(booru, tmp_path, tags="1girl solo rating:g -status:deleted score:>5", limit=1)
    assert [path.name for path in result.added] == ["danbooru_101.png", "danbooru_101.txt"]


def test_credentials_lift_the_tag_limit_and_never_reach_messages_logs_or_files(booru, tmp_path, monkeypatch,
                                                                               caplog):
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", SECRET)
    caplog.set_level(logging.DEBUG)

    result = danbooru(booru, tmp_path, tags="1girl solo smile", limit=1)
    assert booru.api_calls("danbooru")[0]["api_key"] == SECRET and booru.api_calls("danbooru")[0]["login"] == "alice"
    assert all("api_key" not in query for path, query in booru.requests if path.startswith("/data/"))

    booru.errors["/danbooru/posts.json"] = (500, json.dumps({"success": False,
                                                             "message": f"key {SECRET} expired"}).encode())
    with pytest.raises(BooruError, match=r"key \*\*\* expired") as caught:  # even when the site echoes it
        danbooru(booru, tmp_path / "second", tags="1girl solo smile")

    shown = [str(caught.value), str(result), caplog.text]
    shown += [path.read_bytes().decode("latin-1") for path in tmp_path.rglob("*") if path.is_file()]
    assert all(SECRET not in text and "api_key" not in text for text in shown)


def test_http_500_is_a_one_line_error_naming_the_site_and_url(booru, tmp_path):
    booru.errors["/danbooru/posts.json"] = (500, b'{"success": false, "message": "database\\ntimeout"}')

    with pytest.raises(BooruError) as caught:
        danbooru(booru, tmp_path)

    message = str(caught.value)
    assert isinstance(caught.value, user_errors())
    assert "\n" not in message
    assert message.startswith("danbooru: HTTP 500 from ")
    assert f"{booru.url('danbooru')}/posts.json?tags=1girl+solo" in message
    assert message.endswith("database timeout")


def test_gelbooru_refusing_anonymous_requests_says_which_secrets_to_set(booru, tmp_path):
    booru.errors["/gelbooru/index.php"] = (401, b"")

    with pytest.raises(BooruError, match=r"^gelbooru: HTTP 401 from .*\(set GELBOORU_USER_ID and GELBOORU_API_KEY"):
        download_booru("1girl", tmp_path, site="gelbooru", base_url=booru.url("gelbooru"), progress=False)


def test_an_answer_that_is_not_json_is_a_one_line_error_naming_the_site(booru, tmp_path):
    booru.errors["/gelbooru/index.php"] = (200, b"<html>\n<title>Just a moment...</title>")

    with pytest.raises(BooruError) as caught:
        download_booru("1girl", tmp_path, site="gelbooru", base_url=booru.url("gelbooru"), progress=False)

    assert isinstance(caught.value, user_errors())
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(f"gelbooru: the answer from {booru.url('gelbooru')}/index.php?")
    assert "not JSON" in str(caught.value)


def test_an_unreachable_site_is_a_one_line_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    with pytest.raises(BooruError, match=r"^safebooru: cannot reach http://127\.0\.0\.1:\d+/index\.php\?") as caught:
        download_booru("1girl", tmp_path, site="safebooru", base_url=f"http://127.0.0.1:{port}", progress=False,
                       timeout=5)
    assert "\n" not in str(caught.value)


def test_gelbooru_pages_by_pid_unescapes_tags_and_skips_videos_and_missing_files(booru, tmp_path):
    result = download_booru("1girl", tmp_path, site="gelbooru", base_url=booru.url("gelbooru"), limit=10,
                            page_size=2, progress=False)

    assert [call["pid"] for call in booru.api_calls("gelbooru")] == ["0", "1", "2", "3"]
    assert names(tmp_path) == ["gelbooru_11.jpg", "gelbooru_11.txt", "gelbooru_7.png", "gelbooru_7.txt",
                               "gelbooru_8.png", "gelbooru_8.txt"]
    assert (tmp_path / "gelbooru_11.txt").read_text(encoding="utf-8") == "1girl, blue hair, o_o, rock & roll\n"
    assert "gelbooru_10 (webm is not an image" in result.skipped[0]
    assert result.skipped[1] == "gelbooru_9.png (download failed: HTTP 404)"


def test_gelbooru_ratings_leave_the_other_ratings_out_of_the_query(booru, tmp_path):
    result = download_booru("1girl", tmp_path, site="gelbooru", base_url=booru.url("gelbooru"), ratings="g,s",
                            progress=False)

    assert booru.api_calls("gelbooru")[0]["tags"] == "1girl -rating:questionable -rating:explicit"
    assert "gelbooru_8 (rating explicit is not in g,s)" in result.skipped
    assert (tmp_path / "gelbooru_7.png").exists()


def test_safebooru_builds_missing_file_urls_and_filters_ratings_itself(booru, tmp_path):
    result = download_booru("1girl", tmp_path, site="safebooru", base_url=booru.url("safebooru"), ratings="g",
                            min_score=0, page_size=2)  # with a progress bar

    assert booru.api_calls("safebooru")[0]["tags"] == "1girl"  # nothing added: filtered here
    assert [call["pid"] for call in booru.api_calls("safebooru")] == ["0", "1", "2"]  # an empty body ends it
    assert "/safebooru/images/3a/s31.png" in booru.file_calls()
    assert names(tmp_path) == ["safebooru_30.jpg", "safebooru_30.txt", "safebooru_31.png", "safebooru_31.txt"]
    assert result.skipped == ["safebooru_29 (rating questionable is not in g)", "a safebooru post (no post id)"]


def test_other_caption_extensions_are_used_as_given(booru, tmp_path):
    danbooru(booru, tmp_path, limit=1, caption_extension="caption")
    assert names(tmp_path) == ["danbooru_101.caption", "danbooru_101.png"]


@pytest.mark.parametrize(("options", "message"), [
    ({"site": "pixiv"}, "site must be one of danbooru, gelbooru, safebooru"),
    ({"ratings": "g,safe"}, "'safe' is not a rating"),
    ({"limit": 0}, "limit must be at least 1"),
])
def test_bad_arguments_are_one_line_value_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        download_booru("1girl", tmp_path, base_url="http://127.0.0.1:9", progress=False, **options)


def test_parse_ratings_takes_letters_and_words():
    assert parse_ratings("") == set()
    assert parse_ratings("g, Sensitive,explicit") == {"g", "s", "e"}
