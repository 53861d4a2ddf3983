"""The storage layer against real backends: local disk, SeaweedFS (S3) and Azurite (Azure Blob).

Each server is started by this module on 127.0.0.1 and stopped at its end. Objects of one test
live under a prefix of their own, so tests never see each other's keys.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest

from builder.enrollment import Secret
from builder.errors import PayloadError, StorageError, UsageError
from builder.storage import (
    InvalidKeyError,
    ObjectNotFoundError,
    ReleaseConflictError,
    StorageSettings,
    StorageUnavailableError,
    content_key,
    open_store,
    publish_release,
)
from builder.storage import pieces as pc
from tests.support.s3server import azurite, seaweedfs

pytestmark = pytest.mark.timeout(180)

MIB = 1024 * 1024
BASE_SIZE = 30 * MIB
SLOT_SIZE = 8192
SLOT_OFFSET = BASE_SIZE - 20000  # an EXE's certificate table sits at the end of the file


# -- servers and stores ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3server(tmp_path_factory):
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="module")
def azserver(tmp_path_factory):
    with azurite(tmp_path_factory.mktemp("azurite")) as server:
        server.create_container("test")
        yield server


@pytest.fixture(scope="module")
def hmac_key() -> Secret:
    return Secret(secrets.token_hex(32))


@pytest.fixture
def make_store(request, tmp_path, hmac_key):
    """make_store(kind, **settings) -> a store under a fresh prefix (a fresh folder for file://)."""

    def make(kind: str, **overrides):
        prefix = "t-" + uuid.uuid4().hex[:12]
        if kind == "file":
            settings = StorageSettings(**{"hmac_key": hmac_key, **overrides})
            return open_store((tmp_path / "store" / prefix).as_uri(), settings)
        if kind == "s3":
            s3 = request.getfixturevalue("s3server")
            settings = StorageSettings(s3_endpoint=s3.endpoint, s3_access_key_id=s3.access_key,
                                       s3_secret_access_key=Secret(s3.secret_key), **overrides)
            return open_store(s3.url(prefix), settings)
        if kind == "az":
            az = request.getfixturevalue("azserver")
            settings = StorageSettings(azure_connection_string=Secret(az.connection_string), **overrides)
            return open_store(f"az://test/{prefix}", settings)
        raise AssertionError(kind)

    return make


@pytest.fixture(params=["file", "s3", "az"])
def store(request, make_store):
    return make_store(request.param)


@pytest.fixture(scope="module")
def base_bytes() -> bytes:
    return random.Random(1).randbytes(BASE_SIZE)


def stamp(base: bytes, slot: bytes, offset: int = SLOT_OFFSET, checksum: bytes | None = None):
    """Pieces of a stamp as binfmt.tag.stamp_pieces makes them, and the bytes they describe."""
    patches = [(offset, slot)] + ([(216, checksum)] if checksum else [])
    pieces, pos = [], 0
    for off, data in sorted(patches):
        pieces += [("base", pos, off - pos), ("bytes", data)]
        pos = off + len(data)
    pieces.append(("base", pos, len(base) - pos))
    expected = bytearray(base)
    for off, data in patches:
        expected[off:off + len(data)] = data
    return pieces, bytes(expected)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def race(count: int, fn):
    """Run fn(i) in `count` threads released together; results in thread order."""
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


# -- create-if-absent ----------------------------------------------------------------------------


def test_put_if_absent_race_has_one_winner(store):
    datas = [secrets.token_bytes(64 * 1024) for _ in range(16)]
    results = race(16, lambda i: store.put_if_absent("race/obj.bin", datas[i]))
    winners = [i for i, r in enumerate(results) if r.created]
    assert len(winners) == 1, [r.created for r in results]
    seen = race(16, lambda i: store.get("race/obj.bin"))
    assert all(s == datas[winners[0]] for s in seen)
    assert all(r.sha256 == sha(datas[i]) and r.size == len(datas[i]) for i, r in enumerate(results))


def assert_stored_by_a_winner(results, stored: bytes, uploads: list[bytes]) -> None:
    """What a multipart race on SeaweedFS can promise. Amazon S3 evaluates If-None-Match on
    CompleteMultipartUpload atomically: exactly one writer would be told created. SeaweedFS 4.48
    does not (several completes answer 200, the last written wins), and `_still_ours` keeps
    created only for a writer whose object is stored when it checks; a complete landing between
    another writer's complete and its check (seen once here, with two suites sharing 2 cores) leaves two
    told created. Keys are content-addressed, so in use that is the same bytes written twice.
    What must hold: some writer was told created, and the stored object is such a writer's
    whole upload (uploads[i]: what writer i sent)."""
    created = {sha(uploads[i]) for i, r in enumerate(results) if r.created}
    assert created, "no writer was told it created the object"
    assert sha(stored) in created, "the stored object is not the upload of a writer told created"


def test_s3_multipart_put_race_stores_one_whole_upload(make_store, s3server, tmp_path):
    store = make_store("s3")
    paths = []
    for i in range(4):
        path = tmp_path / f"big{i}.bin"
        path.write_bytes(random.Random(i).randbytes(17 * MIB))  # over the 16 MiB multipart threshold
        paths.append(path)
    results = race(4, lambda i: store.put_if_absent("big.bin", paths[i]))
    assert_stored_by_a_winner(results, store.get("big.bin"), [p.read_bytes() for p in paths])
    assert all(r.sha256 == sha(p.read_bytes()) for r, p in zip(results, paths))
    # Losers aborted their uploads: nothing is left to bill.
    uploads = s3server.client().list_multipart_uploads(Bucket=s3server.bucket, Prefix=store.prefix)
    assert not uploads.get("Uploads")


def test_never_overwrites(store, tmp_path):
    assert store.put_if_absent("a/b.txt", b"first").created
    again = store.put_if_absent("a/b.txt", b"second, longer")
    assert not again.created
    path = tmp_path / "other.txt"
    path.write_bytes(b"third")
    assert not store.put_if_absent("a/b.txt", path).created
    store.put_if_absent("base.bin", b"0123456789")
    assert not store.put_pieces_if_absent("a/b.txt", "base.bin", [("base", 0, 4), ("bytes", b"xx")]).created
    assert store.get("a/b.txt") == b"first"
    assert store.head("a/b.txt").size == 5


def test_reads_head_exists_list(store):
    store.put_if_absent("r/one.bin", b"abcdefgh")
    store.put_if_absent("r/sub/two.bin", b"xyz")
    store.put_if_absent("rx/three.bin", b"!")
    assert store.open_range("r/one.bin", 2, 5) == b"cde"
    assert store.head("r/one.bin").size == 8 and store.head("r/one.bin").etag
    assert store.exists("r/one.bin") and not store.exists("r/none.bin")
    with pytest.raises(ObjectNotFoundError):
        store.get("r/none.bin")
    assert [o.key for o in store.list("r")] == ["r/one.bin", "r/sub/two.bin"]  # not rx/
    assert [o.key for o in store.list()] == ["r/one.bin", "r/sub/two.bin", "rx/three.bin"]


def test_download_streams_an_object_into_a_new_file(store, base_bytes, tmp_path):
    store.put_if_absent("d/base.bin", base_bytes)
    digest, size = store.download("d/base.bin", tmp_path / "copy", chunk_size=1 << 16)
    assert (tmp_path / "copy").read_bytes() == base_bytes
    assert (digest, size) == (hashlib.sha256(base_bytes).hexdigest(), len(base_bytes))
    with pytest.raises(ObjectNotFoundError):
        store.download("d/none.bin", tmp_path / "none")
    (tmp_path / "planted").symlink_to(tmp_path / "copy")
    with pytest.raises(FileExistsError):  # a new file only: nothing is written through a planted link
        store.download("d/base.bin", tmp_path / "planted")


# -- stamps ------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_checksum", [False, True], ids=["slot", "slot+checksum"])
def test_put_pieces_materialises_exactly(store, base_bytes, with_checksum):
    base = base_bytes if store.kind != "az" else base_bytes[:4 * MIB]  # Azure: the in-memory path
    offset = len(base) - 20000
    pieces, expected = stamp(base, secrets.token_bytes(SLOT_SIZE), offset, b"\x01\x02\x03\x04" if with_checksum else None)
    store.put_if_absent("objects/base.exe", base)
    result = store.put_pieces_if_absent("groups/g1.exe", "objects/base.exe", pieces)
    assert result.created and result.size == len(expected)
    assert sha(store.get("groups/g1.exe")) == sha(expected)
    if result.sha256 is not None:
        assert result.sha256 == sha(expected)
    assert b"".join(store.stream_pieces("objects/base.exe", pieces)) == expected


def test_s3_stamp_copies_server_side_and_uploads_little(make_store, base_bytes):
    store = make_store("s3")
    store.put_if_absent("base.exe", base_bytes)

    pieces, expected = stamp(base_bytes, secrets.token_bytes(SLOT_SIZE))
    result = store.put_pieces_if_absent("g-slot.exe", "base.exe", pieces)
    assert sha(store.get("g-slot.exe")) == sha(expected)
    # Only the tail from the slot to the end is uploaded; the rest is UploadPartCopy.
    assert result.bytes_uploaded <= 64 * 1024, result
    assert result.bytes_copied >= BASE_SIZE - 64 * 1024, result
    assert result.bytes_uploaded + result.bytes_copied == BASE_SIZE

    # With the PE CheckSum (offset 216) changed too, the first part must be uploaded, and S3's
    # 5 MiB minimum part size sets its size.
    pieces, expected = stamp(base_bytes, secrets.token_bytes(SLOT_SIZE), checksum=b"\xaa\xbb\xcc\xdd")
    result = store.put_pieces_if_absent("g-checksum.exe", "base.exe", pieces)
    assert sha(store.get("g-checksum.exe")) == sha(expected)
    assert result.bytes_uploaded <= 5 * MIB + 64 * 1024, result
    assert result.parts == 3


def test_s3_stamp_race_stores_one_whole_stamp(make_store, s3server, base_bytes):
    store = make_store("s3")
    store.put_if_absent("base.exe", base_bytes)
    slots = [secrets.token_bytes(SLOT_SIZE) for _ in range(6)]
    results = race(6, lambda i: store.put_pieces_if_absent("g.exe", "base.exe", stamp(base_bytes, slots[i])[0]))
    assert_stored_by_a_winner(results, store.get("g.exe"), [stamp(base_bytes, s)[1] for s in slots])
    uploads = s3server.client().list_multipart_uploads(Bucket=s3server.bucket, Prefix=store.prefix)
    assert not uploads.get("Uploads")


def test_s3_conditional_complete_never_overwrites(make_store, s3server, base_bytes, monkeypatch):
    """The object appears after the existence check (a race): the upload's conditional
    CompleteMultipartUpload must refuse to replace it."""
    store = make_store("s3")
    store.put_if_absent("big.bin", b"original")
    monkeypatch.setattr(store, "exists", lambda key: False)
    result = store.put_if_absent("big.bin", base_bytes[:17 * MIB])
    assert not result.created and store.get("big.bin") == b"original"

    store.put_if_absent("base.exe", base_bytes[:12 * MIB])
    store.put_if_absent("g.exe", b"first stamp")
    real_head = store.head

    def head(key):
        if key == "g.exe":
            raise ObjectNotFoundError("not yet", key=key)
        return real_head(key)

    monkeypatch.setattr(store, "head", head)
    pieces, _ = stamp(base_bytes[:12 * MIB], secrets.token_bytes(SLOT_SIZE), 12 * MIB - 20000)
    assert not store.put_pieces_if_absent("g.exe", "base.exe", pieces).created
    assert store.get("g.exe") == b"first stamp"
    uploads = s3server.client().list_multipart_uploads(Bucket=s3server.bucket, Prefix=store.prefix)
    assert not uploads.get("Uploads")


def test_bad_pieces_are_refused(store):
    store.put_if_absent("base.bin", b"0123456789")
    for pieces in ([("base", 0, 11)], [("base", -1, 2)], [("copy", 0, 1)], [("bytes", "text")]):
        with pytest.raises(StorageError):
            store.put_pieces_if_absent("out.bin", "base.bin", pieces)
        with pytest.raises(StorageError):
            store.stream_pieces("base.bin", pieces)
    with pytest.raises(ObjectNotFoundError):
        store.stream_pieces("missing.bin", [("base", 0, 1)])
    assert not store.exists("out.bin")


def _brute_force_cost(segs, total, min_part):
    """The least uploaded bytes over every possible set of part boundaries (tiny sizes only)."""
    runs = [s for s in segs if s.is_base]
    best = [0] + [None] * total
    for end in range(1, total + 1):
        for start in range(end):
            if best[start] is None or (end < total and end - start < min_part):
                continue
            copy = any(r.start <= start and end <= r.end for r in runs)
            cost = best[start] + (0 if copy else end - start)
            if best[end] is None or cost < best[end]:
                best[end] = cost
    return best[total]


def test_part_plan_is_valid_and_cheapest():
    rng = random.Random(7)
    for _ in range(300):
        base = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        min_part = rng.choice([4, 8, 16])
        pieces, pos = [], 0
        while pos < len(base):
            n = rng.randrange(1, len(base) - pos + 1)
            if rng.random() < 0.3:
                pieces.append(("bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))))
            pieces.append(("base", pos, n))
            pos += n
        segs = pc.segments(pieces, len(base))
        total = pc.output_size(segs)
        expected = b"".join(base[p[1]:p[1] + p[2]] if p[0] == "base" else p[1] for p in pieces)
        plan = pc.plan_parts(segs, min_part=min_part, max_copy=1 << 20, upload_chunk=1 << 20)
        assert plan[0].start == 0 and plan[-1].end == total
        built = b""
        for i, part in enumerate(plan):
            assert i == 0 or plan[i - 1].end == part.start
            assert part.size >= min_part or i == len(plan) - 1
            if part.is_copy:
                built += base[part.copy_from:part.copy_from + part.size]
            else:
                built += b"".join(s.data if not s.is_base else base[s.src:s.src + s.end - s.start]
                                  for s in pc.ranges(segs, part.start, part.end))
        assert built == expected
        uploaded = sum(p.size for p in plan if not p.is_copy)
        assert uploaded == _brute_force_cost(segs, total, min_part), (pieces, min_part, plan)


# -- download URLs -----------------------------------------------------------------------------


def _tamper(url: str, field: str) -> str:
    parts = urlsplit(url)
    query = [(k, ("A" if v[0] != "A" else "B") + v[1:] if k == field else v)
             for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(query=urlencode(query)))


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("kind", ["s3", "az"])
def test_presigned_url_is_served_then_refused(make_store, kind):
    store = make_store(kind)
    store.put_if_absent("dl/agent.exe", b"signed installer bytes")
    url = store.presigned_url("dl/agent.exe", 600)
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b"signed installer bytes"
    tampered = _tamper(url, "X-Amz-Signature" if kind == "s3" else "sig")
    assert tampered != url
    assert _status(tampered) == 403
    other = url.replace("dl/agent.exe", "dl/other.exe")  # a signature is for one key only
    assert _status(other) in (403, 404)
    short = store.presigned_url("dl/agent.exe", 1)
    time.sleep(2.2)
    assert _status(short) == 403


def test_capabilities_say_how_an_object_reaches_a_client(store):
    """S3 and Azure presign; local disk has none, and its objects are files the service sends."""
    store.put_if_absent("dl/agent.exe", b"signed installer bytes")
    assert store.presigned_links is (store.kind != "file")
    if store.presigned_links:
        assert store.local_path("dl/agent.exe") is None
        assert store.presigned_url("dl/agent.exe", 60).startswith("http")
    else:
        assert store.local_path("dl/agent.exe").read_bytes() == b"signed installer bytes"
        with pytest.raises(StorageError, match="presigned"):
            store.presigned_url("dl/agent.exe", 60)


# -- hostile keys ------------------------------------------------------------------------------

HOSTILE_KEYS = ["../escape", "a/../../escape", "/etc/passwd", "a\\b", "a\x00b", "a\nb", "a\rb", "%2e%2e/x",
                "a//b", "a/", ".hidden", "a/./b", "a/..", "..", ".", "ü", "a b", "", "x" * 600, "a?b", "a#b",
                "C:\\x", "~/x"]


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_hostile_keys_never_reach_the_backend(make_store, kind, tmp_path):
    store = make_store(kind)
    store.put_if_absent("base.bin", b"0123456789")
    before = sorted(p for p in tmp_path.rglob("*"))
    for key in HOSTILE_KEYS + [None, 5]:
        calls = [
            lambda: store.put_if_absent(key, b"x"),
            lambda: store.get(key),
            lambda: store.head(key),
            lambda: store.exists(key),
            lambda: store.open_range(key, 0, 1),
            lambda: store.put_pieces_if_absent(key, "base.bin", [("base", 0, 1)]),
            lambda: store.put_pieces_if_absent("ok.bin", key, [("base", 0, 1)]),
            lambda: store.stream_pieces(key, [("base", 0, 1)]),
            lambda: store.presigned_url(key, 60),
        ]
        if key != "":
            calls.append(lambda: store.list(key))  # "" is the root: a valid prefix
        for call in calls:
            with pytest.raises(InvalidKeyError) as info:
                call()
            assert isinstance(info.value, ValueError) and isinstance(info.value, StorageError)
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert [o.key for o in store.list()] == ["base.bin"]
    for bad in (("p", "A" * 64, ""), ("p", "a" * 63, ""), ("p", "a" * 64, "/x"), ("../p", "a" * 64, ".exe")):
        with pytest.raises(InvalidKeyError):
            content_key(*bad)
    assert content_key("p/objects", "ab" * 32, ".exe") == f"p/objects/ab/{'ab' * 32}.exe"


# -- unreachable backends ----------------------------------------------------------------------


def _settings(endpoint: str, **overrides) -> StorageSettings:
    values = dict(s3_endpoint=endpoint, s3_access_key_id="AKIDTESTONLY", s3_secret_access_key=Secret("s3cr3t-value-never-shown"),
                  connect_timeout_s=1, read_timeout_s=1, max_retries=1, retry_timeout_s=5, retry_after_s=17)
    values.update(overrides)
    return StorageSettings(**values)


def _assert_unavailable(call, endpoint: str, limit_s: float = 8):
    start = time.monotonic()
    with pytest.raises(StorageUnavailableError) as info:
        call()
    elapsed = time.monotonic() - start
    assert elapsed < limit_s, elapsed
    message = str(info.value)
    assert endpoint in message and "retry later" in message
    assert "s3cr3t" not in message and "AKIDTESTONLY" not in message
    assert info.value.retry_after == 17 and info.value.exit_code == 12


def test_refused_connection_is_storage_error_quickly():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    endpoint = f"http://127.0.0.1:{port}"
    store = open_store("s3://bucket/prefix", _settings(endpoint))
    _assert_unavailable(lambda: store.get("a.bin"), endpoint)
    _assert_unavailable(lambda: store.put_if_absent("a.bin", b"x"), endpoint)
    _assert_unavailable(lambda: store.put_pieces_if_absent("a.bin", "b.bin", [("base", 0, 1)]), endpoint)
    _assert_unavailable(lambda: list(store.list()), endpoint)


def test_connect_timeout_is_storage_error_quickly():
    # A listener whose accept queue is full drops new SYNs: a connect that hangs, on loopback.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.settimeout(0.3)
            try:
                c.connect(("127.0.0.1", port))
            except OSError:
                pass
            fillers.append(c)
        endpoint = f"http://127.0.0.1:{port}"
        store = open_store("s3://bucket/prefix", _settings(endpoint, max_retries=0))
        _assert_unavailable(lambda: store.head("a.bin"), endpoint, limit_s=4)
    finally:
        for c in fillers:
            c.close()
        server.close()


class _HalfS3(http.server.BaseHTTPRequestHandler):
    """Answers HEAD like S3 (a base object exists, the target does not), then goes silent."""

    def do_HEAD(self):  # noqa: N802
        if self.path.endswith("/base.exe"):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.send_header("ETag", '"0123"')
            self.send_header("Last-Modified", "Sat, 01 Jan 2028 00:00:00 GMT")
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802 - CreateMultipartUpload: never answered in time
        time.sleep(3)
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_silent_server_during_stamp_is_storage_error_quickly():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HalfS3)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        store = open_store("s3://bucket/prefix", _settings(endpoint, max_retries=0))
        _assert_unavailable(lambda: store.put_pieces_if_absent("out.exe", "base.exe", [("base", 0, 50), ("bytes", b"x")]),
                            endpoint, limit_s=6)
    finally:
        server.shutdown()
        server.server_close()


# -- releases ----------------------------------------------------------------------------------


class _Recorder:
    """The store, with every put recorded, and (at the manifest's put) which named objects exist."""

    def __init__(self, store, fail_on: str | None = None):
        self._store, self.puts, self.present_at_manifest, self._fail_on = store, [], None, fail_on

    def __getattr__(self, name):
        return getattr(self._store, name)

    def put_if_absent(self, key, data):
        if self._fail_on and key.endswith(self._fail_on):
            raise StorageUnavailableError("injected", retry_after=1)
        if key.endswith("/index.json") and "/releases/" in key:
            index = json.loads(bytes(data))
            self.present_at_manifest = {e["key"]: self._store.exists(e["key"]) for e in index["files"].values()}
        result = self._store.put_if_absent(key, data)
        self.puts.append((key, result.created))
        return result


def _release(folder: Path, seed: int) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    (folder / "agent.exe").write_bytes(rng.randbytes(3 * MIB))
    (folder / "agent.msi").write_bytes(rng.randbytes(2 * MIB))
    (folder / "macos").mkdir()
    (folder / "macos" / "agent.pkg").write_bytes(rng.randbytes(1 * MIB))
    (folder / "manifest.json").write_text(json.dumps({"version": folder.name, "seed": seed}))
    return folder


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_publish_release_writes_manifest_last_and_is_idempotent(make_store, kind, tmp_path):
    store = make_store(kind)
    folder = _release(tmp_path / "1.2.3", seed=1)

    failing = _Recorder(store, fail_on=".msi")  # an upload that fails part-way
    with pytest.raises(StorageUnavailableError):
        publish_release(folder, failing, "agents")
    assert not store.exists("agents/releases/1.2.3/index.json")

    recorder = _Recorder(store)
    mkey = publish_release(folder, recorder, "agents")
    assert mkey == "agents/releases/1.2.3/index.json"
    assert recorder.puts[-1] == (mkey, True)
    assert recorder.present_at_manifest and all(recorder.present_at_manifest.values())
    index = json.loads(store.get(mkey))
    assert sorted(index["files"]) == ["agent.exe", "agent.msi", "macos/agent.pkg", "manifest.json"]
    for name, entry in index["files"].items():
        data = (folder / name).read_bytes()
        assert entry["sha256"] == sha(data) and entry["size"] == len(data)
        assert entry["key"].startswith("agents/objects/") and sha(store.get(entry["key"])) == sha(data)

    before = store.list()
    again = _Recorder(store)
    assert publish_release(folder, again, "agents") == mkey
    assert again.puts == [] and store.list() == before  # a no-op

    other = _release(tmp_path / "elsewhere" / "1.2.3", seed=2)
    with pytest.raises(ReleaseConflictError):
        publish_release(other, store, "agents")
    assert store.get(mkey) == json.dumps(index, indent=2, sort_keys=True).encode() + b"\n"

    # Same bytes under a new version: no object is uploaded twice, only a new index.
    newer = _Recorder(store)
    publish_release(folder, newer, "agents", version="1.2.4")
    assert [created for _, created in newer.puts] == [False] * 4 + [True]

    incomplete = tmp_path / "2.0.0"
    incomplete.mkdir()
    (incomplete / "agent.exe").write_bytes(b"x")
    with pytest.raises(PayloadError, match="manifest.json"):
        publish_release(incomplete, store, "agents")


# -- settings ----------------------------------------------------------------------------------


def test_settings_from_env_masks_secrets():
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ACCESS_KEY_ID": "AKIDX",
           "AWS_SECRET_ACCESS_KEY": "secret-value-123", "AWS_REGION": "eu-west-1",
           "AZURE_STORAGE_CONNECTION_STRING": "AccountName=acct;AccountKey=a2V5LXZhbHVl;BlobEndpoint=http://127.0.0.1:10000/acct",
           "BUILDER_STORAGE_HMAC_KEY": "h" * 40, "UNRELATED": "x"}
    settings = StorageSettings.from_env(env)
    assert settings.s3_endpoint == "http://127.0.0.1:9000" and settings.s3_region == "eu-west-1"
    assert settings.s3_secret_access_key.reveal() == "secret-value-123"
    creds = settings.azure_credentials()
    assert (creds.account_name, creds.account_key.reveal(), creds.endpoint) == ("acct", "a2V5LXZhbHVl", "http://127.0.0.1:10000/acct")
    text = repr(settings)
    assert "secret-value-123" not in text and "a2V5LXZhbHVl" not in text and "h" * 40 not in text
    store = open_store("s3://bucket/p", settings)
    assert "secret" not in store.url and "AKIDX" not in store.url
    assert StorageSettings.from_env({}).s3_endpoint is None
    with pytest.raises(UsageError):
        StorageSettings.from_env({"AWS_ENDPOINT_URL": "http://user:pw@127.0.0.1:9000"})
    with pytest.raises(UsageError):
        StorageSettings.from_env({"BUILDER_STORAGE_HMAC_KEY": "short"})
    for url in ("ftp://x/y", "s3://Bad_Bucket/p", "s3://bucket/../p", "file://host/x", "az://-x-/p", "s3://k:s@bucket/p"):
        with pytest.raises((UsageError, InvalidKeyError)):
            open_store(url, settings)


def _formats_release(folder: Path, version: str, formats: list[str], seed: int) -> Path:
    """A release folder as published: a release manifest naming its formats, and their files."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    files = {}
    for fmt in formats:
        (folder / f"agent.{fmt}").write_bytes(rng.randbytes(64 * 1024))
        files[fmt] = {"file": f"agent.{fmt}"}
    (folder / "manifest.json").write_text(json.dumps({"version": version, "signed": True, "files": files}))
    return folder


@pytest.mark.parametrize("kind", ["file", "s3", "az"])
def test_prune_removes_old_releases_and_what_only_they_use(make_store, kind, tmp_path):
    from builder.storage.published import prune, prune_plan, published_releases

    store = make_store(kind)
    for i, (version, fmts) in enumerate((("1.0.0", ["msi", "pkg"]), ("1.0.1", ["msi"]), ("1.0.2", ["msi"]))):
        publish_release(_formats_release(tmp_path / version, version, fmts, seed=i), store, "dist", version=version)
    # An installer issued from 1.0.1, and its record; one from 1.0.0.
    for rid, version in (("a" * 32, "1.0.1"), ("b" * 32, "1.0.0")):
        store.put_if_absent(f"installers/{rid[:2]}/{rid}.msi", b"installer of " + version.encode())
        store.put_if_absent(f"records/{rid}.json", json.dumps({"release": version, "key": f"installers/{rid[:2]}/{rid}.msi"}).encode())
    # A record that names a kept release's object (written by anyone but the service): that object stays.
    kept_object = json.loads(store.get("dist/releases/1.0.2/index.json"))["files"]["agent.msi"]["key"]
    store.put_if_absent(f"records/{'c' * 32}.json", json.dumps({"release": "1.0.1", "key": kept_object}).encode())
    old_objects = {e["key"] for e in json.loads(store.get("dist/releases/1.0.1/index.json"))["files"].values()}
    plan = prune_plan(store, "dist", keep=1)
    assert (plan["keep"], plan["remove"]) == (["1.0.0", "1.0.2"], ["1.0.1"])
    assert plan["keys"][:3] == [f"records/{'a' * 32}.json", f"records/{'c' * 32}.json",  # records first
                                f"installers/aa/{'a' * 32}.msi"]
    prune(store, plan)
    left = {o.key for o in store.list()}
    assert not (old_objects & left) and not any(k.startswith("dist/releases/1.0.1/") for k in left)
    assert f"records/{'b' * 32}.json" in left and f"installers/bb/{'b' * 32}.msi" in left
    assert kept_object in left and f"records/{'c' * 32}.json" not in left
    assert [r["version"] for r in published_releases(store, "dist")] == ["1.0.0", "1.0.2"]
    for version in ("1.0.0", "1.0.2"):  # what stays is whole
        index = json.loads(store.get(f"dist/releases/{version}/index.json"))
        assert all(store.exists(e["key"]) for e in index["files"].values())
    prune(store, plan)  # removing what is already gone is fine
