"""Load and fault tests against a real tritonserver on loopback (bounded in count and time).

* soak: 64 concurrent clients, 10,000 mixed requests (a fifth of them invalid): every valid request
  gets the embedding its item gets alone, every invalid one a clear INVALID_ARGUMENT, none lost, the
  server ready throughout, and the server's resident memory flat after warm-up;
* a python-backend stub killed mid-job: the canary notices, the watchdog restarts the server, the
  ClipClient job finishes with every item answered once;
* a corpus of 30+ bad inputs, each with its expected error.
"""

import io
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from clip_triton import contract as C
from clip_triton.client import ClipClient
from clip_triton.health import canary
from clip_triton.repository import RepoOptions, write_repository
from clip_triton.server import TritonServer


def png(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tree_rss_mib(pid: int) -> float:
    """Resident memory of a process and all its descendants (tritonserver + python stubs)."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,rss="], capture_output=True, text=True, check=True).stdout
    rows = [tuple(int(x) for x in line.split()) for line in out.splitlines() if line.strip()]
    children: dict[int, list[int]] = {}
    for child, parent, _ in rows:
        children.setdefault(parent, []).append(child)
    rss = {p: r for p, _, r in rows}
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack.extend(children.get(current, []))
    return total / 1024


@pytest.fixture(scope="module")
def soak_server(tiny_export, tmp_path_factory):
    """The CPU defaults (2 ms queue delay, one preprocess instance per core), as `clip-triton repo` writes."""
    folder = tmp_path_factory.mktemp("soak")
    repo = write_repository(folder / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))
    server = TritonServer(repo, log_file=folder / "triton.log").start(timeout=120)
    yield server
    server.stop()


def test_soak_mixed_valid_and_invalid(soak_server):
    images = [png(i, (24 + i % 13, 30)) for i in range(24)]
    texts = [f"caption {i}: a photo of thing number {i}" for i in range(24)]
    bad = [
        ("IMAGE", b""),
        ("IMAGE", b"<html>nope</html>"),
        ("IMAGE", images[0][:60]),
        ("TEXT", b"\xff\xfe"),
        ("TEXT", b"   "),
    ]
    client = grpcclient.InferenceServerClient(soak_server.grpc_url)

    def send(c, kind, item):
        model = C.IMAGE_ENSEMBLE if kind == "IMAGE" else C.TEXT_ENSEMBLE
        tensor = grpcclient.InferInput(kind, [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[item]], dtype=object))
        return c.infer(model, [tensor], client_timeout=60).as_numpy(C.EMBEDDING_OUTPUT)[0]

    alone = {("IMAGE", i): send(client, "IMAGE", b) for i, b in enumerate(images)}  # each item sent alone
    alone.update({("TEXT", i): send(client, "TEXT", t.encode()) for i, t in enumerate(texts)})

    rng = np.random.default_rng(0)
    jobs = []
    for n in range(10_000):
        if n % 5 == 4:
            jobs.append(("bad", *bad[int(rng.integers(len(bad)))]))
        elif rng.random() < 0.5:
            i = int(rng.integers(len(images)))
            jobs.append((("IMAGE", i), "IMAGE", images[i]))
        else:
            i = int(rng.integers(len(texts)))
            jobs.append((("TEXT", i), "TEXT", texts[i].encode()))

    ready_samples, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            ready_samples.append(soak_server.ready())
            time.sleep(0.25)

    watcher = threading.Thread(target=watch)
    watcher.start()
    local = threading.local()
    rss = {}

    def run(index):
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(soak_server.grpc_url)
        if index == 2_000:
            rss["warm"] = tree_rss_mib(soak_server.process.pid)
        key, kind, item = jobs[index]
        try:
            return send(local.client, kind, item)
        except InferenceServerException as exc:
            return exc

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(run, range(len(jobs))))
    finally:
        stop.set()
        watcher.join()
    elapsed = time.monotonic() - started
    rss["end"] = tree_rss_mib(soak_server.process.pid)

    assert len(results) == len(jobs) == 10_000  # none lost
    worst = 0.0
    for (key, _kind, _), result in zip(jobs, results):
        if key == "bad":
            assert isinstance(result, InferenceServerException), "an invalid request was answered"
            assert result.status() == "StatusCode.INVALID_ARGUMENT" and "item 0:" in result.message()
        else:
            assert isinstance(result, np.ndarray), f"valid request failed: {result}"
            worst = max(worst, float(np.abs(result - alone[key]).max()))
    assert worst < 1e-5  # each answer is its own item's embedding, whatever it was batched with
    assert ready_samples and all(ready_samples)
    assert rss["end"] - rss["warm"] < max(64.0, 0.1 * rss["warm"]), rss  # flat after warm-up
    print(
        f"\nsoak: 10,000 requests (2,000 invalid) from 64 clients in {elapsed:.1f} s "
        f"({10_000 / elapsed:.0f} req/s); max |diff| vs alone {worst:.2e}; "
        f"server RSS {rss['warm']:.0f} MiB after warm-up, {rss['end']:.0f} MiB at the end"
    )


def stub_pids(server: TritonServer, model: str) -> list[int]:
    """Python-backend stub processes serving `model` from this server's repository (from /proc, since
    `ps` cuts long command lines to the terminal width)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                args = handle.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if (
            args
            and args[0].endswith("triton_python_backend_stub")
            and len(args) > 1
            and args[1].startswith(f"{server.repo}/{model}/")
            and _parent(int(entry)) == server.process.pid
        ):
            found.append(int(entry))
    return found


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


@pytest.fixture()
def own_repo(tiny_export, tmp_path):
    """A repository of the test's own: killing its stubs cannot touch the session's server."""
    return write_repository(tmp_path / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python"))


@pytest.mark.parametrize(("stub", "cache"), [("tokenizer", "text"), ("preprocess", "all")])
def test_killed_stub_fails_the_canary_while_triton_says_ready(tiny_export, tmp_path, stub, cache):
    """Also with the response cache on for the stub's ensemble: a canary answered from the cache (a
    repeated canary request) would never reach the dead stub, so every canary is a new request."""
    own_repo = write_repository(
        tmp_path / "repo", onnx_dir=tiny_export, options=RepoOptions(runtime="python", response_cache=cache)
    )
    server = TritonServer(own_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    try:
        assert canary(server.grpc_url) == (True, "ok")
        for pid in stub_pids(server, stub):  # every instance (preprocess has one per core)
            os.kill(pid, signal.SIGKILL)
        time.sleep(1.0)
        healthy, reason = canary(server.grpc_url)
        assert not healthy and "not healthy" in reason
        assert server.ready()  # Triton itself still reports ready: why the canary exists
        state = {}
        assert server.watchdog_step(state) is False and state["failures"] == 1
        assert server.watchdog_step(state) is True and state["restarts"] == 1  # second failure: restart
        assert canary(server.grpc_url) == (True, "ok")
    finally:
        server.stop()


def test_job_survives_a_killed_stub(own_repo, tmp_path, open_clip_reference):
    """A ClipClient job keeps going while a stub is killed and the watchdog restarts the server."""
    server = TritonServer(own_repo, log_file=tmp_path / "triton.log").start(timeout=120)
    texts = [f"text number {i}" for i in range(60)]
    expected = open_clip_reference.texts(texts)
    stop, state = threading.Event(), {}
    # Events, not the clock: the stub is killed once the job has answers, and the job goes on only
    # after the kill, so requests land on both sides of it on any machine.
    answered, killed = threading.Event(), threading.Event()

    def chaos_and_watchdog():
        if not answered.wait(300) or stop.is_set():
            return
        os.kill(stub_pids(server, "tokenizer")[0], signal.SIGKILL)
        state["killed"] = time.monotonic()
        killed.set()
        while not stop.is_set() and not state.get("restarts"):
            server.watchdog_step(state, failures_before_restart=1)
            time.sleep(0.3)

    thread = threading.Thread(target=chaos_and_watchdog)
    thread.start()
    rows, finished = [], []
    try:
        with ClipClient(server.grpc_url, backoff=0.25) as client:  # the default retry budget outlasts a restart
            for start in range(0, len(texts), 3):
                rows.append(client.embed_texts(texts[start : start + 3]))
                finished.append(time.monotonic())
                if len(finished) == 3:
                    answered.set()
                    assert killed.wait(300), "the stub was not killed"
                time.sleep(0.1)
    finally:
        stop.set()
        answered.set()
        thread.join()
        server.stop()
    assert state.get("restarts") == 1
    assert any(t < state["killed"] for t in finished) and any(t > state["killed"] for t in finished)
    served = np.concatenate(rows)
    assert served.shape == (60, 32)
    assert np.abs(served - expected).max() < 1e-4  # every item answered once, in order


# ------------------------------------------------------------------------------------------------
# Bad-input corpus: (label, model, input name, datatype, array, expected status, message fragment)
# ------------------------------------------------------------------------------------------------
def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _corpus():
    photo = Image.open(io.BytesIO(png(7, (64, 48)))).convert("RGB")
    jpeg, png_bytes = _encode(photo, "JPEG"), _encode(photo, "PNG")
    bad_crc = bytearray(png_bytes)
    bad_crc[60:90] = b"\x00" * 30
    frames = [photo, photo.rotate(90), photo.rotate(180)]
    animated = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    ok, bad = "ok", "StatusCode.INVALID_ARGUMENT"
    img, txt = (C.IMAGE_ENSEMBLE, "IMAGE"), (C.TEXT_ENSEMBLE, "TEXT")
    one = lambda item: np.array([[item]], dtype=object)  # noqa: E731
    cases = [
        ("zero bytes", *img, "BYTES", one(b""), bad, "empty image"),
        ("random bytes", *img, "BYTES", one(os.urandom(2048)), bad, "not a decodable image"),
        ("plain text", *img, "BYTES", one(b"hello, I am not an image"), bad, "not a decodable image"),
        ("html", *img, "BYTES", one(b"<!doctype html><html><body>x</body></html>"), bad, "not a decodable image"),
        (
            "svg",
            *img,
            "BYTES",
            one(b"<svg xmlns='http://www.w3.org/2000/svg' width='9' height='9'/>"),
            bad,
            "not a decodable image",
        ),
        ("pdf header", *img, "BYTES", one(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"), bad, "not a decodable image"),
        ("jpeg magic only", *img, "BYTES", one(b"\xff\xd8\xff\xe0"), bad, "image"),
        ("truncated jpeg", *img, "BYTES", one(jpeg[: len(jpeg) // 2]), bad, "corrupt or truncated"),
        ("truncated png", *img, "BYTES", one(png_bytes[: len(png_bytes) // 2]), bad, "corrupt or truncated"),
        ("png with bad crc", *img, "BYTES", one(bytes(bad_crc)), bad, "corrupt or truncated"),
        ("truncated webp", *img, "BYTES", one(_encode(photo, "WEBP")[:40]), bad, "image"),
        ("truncated bmp", *img, "BYTES", one(_encode(photo, "BMP")[:100]), bad, "corrupt or truncated"),
        ("truncated tiff", *img, "BYTES", one(_encode(photo, "TIFF")[:200]), bad, "image"),
        (
            "png decompression bomb",
            *img,
            "BYTES",
            one(_encode(Image.new("1", (12_000, 12_000)), "PNG")),
            bad,
            "over the limit",
        ),
        (
            "gif decompression bomb",
            *img,
            "BYTES",
            one(_encode(Image.new("P", (9_000, 9_000)), "GIF")),
            bad,
            "over the limit",
        ),
        ("1x1 image", *img, "BYTES", one(_encode(photo.resize((1, 1)), "PNG")), ok, ""),
        ("animated gif (first frame)", *img, "BYTES", one(animated), ok, ""),
        (
            "16-bit grayscale png",
            *img,
            "BYTES",
            one(_encode(Image.fromarray(np.full((9, 9), 40000, np.uint16)), "PNG")),
            ok,
            "",
        ),
        ("cmyk jpeg", *img, "BYTES", one(_encode(photo.convert("CMYK"), "JPEG")), ok, ""),
        # a request of several items is answered whole; the bad one is flagged in STATUS (test_serving)
        ("one bad item in a batch", *img, "BYTES", np.array([[jpeg], [b"junk"], [jpeg]], dtype=object), ok, ""),
        ("invalid utf-8", *txt, "BYTES", one(b"\xff\xfe\xfd"), bad, "not valid UTF-8"),
        ("truncated utf-8 sequence", *txt, "BYTES", one("café".encode()[:-1]), bad, "not valid UTF-8"),
        ("utf-16 text", *txt, "BYTES", one("hello".encode("utf-16")), bad, "not valid UTF-8"),
        ("empty text", *txt, "BYTES", one(b""), bad, "empty text"),
        ("whitespace text", *txt, "BYTES", one(b" \t\n "), bad, "empty text"),
        ("huge text", *txt, "BYTES", one(b"z" * 100_000), bad, "over the limit"),
        ("long text is truncated, not refused", *txt, "BYTES", one(b"word " * 2000), ok, ""),
        ("nul bytes in text", *txt, "BYTES", one(b"a\x00b"), ok, ""),
        ("image input as FP32", C.IMAGE_ENSEMBLE, "IMAGE", "FP32", np.zeros((1, 1), np.float32), bad, "data-type"),
        (
            "image input wrong shape",
            C.IMAGE_ENSEMBLE,
            "IMAGE",
            "BYTES",
            np.array([[b"a", b"b"]], dtype=object),
            bad,
            "unexpected shape",
        ),
        ("text input as INT32", C.TEXT_ENSEMBLE, "TEXT", "INT32", np.zeros((1, 1), np.int32), bad, "data-type"),
        ("unknown input name", C.TEXT_ENSEMBLE, "PROMPT", "BYTES", one(b"x"), bad, "PROMPT"),
        ("batch over max_batch_size", *txt, "BYTES", np.array([[b"x"]] * 65, dtype=object), bad, "batch"),
        (
            "pixels of the wrong size to the encoder",
            C.VISION_MODEL,
            C.PIXELS,
            "FP32",
            np.zeros((1, 3, 16, 16), np.float32),
            bad,
            "unexpected shape",
        ),
        (
            "int64 ids to the text encoder",
            C.TEXT_MODEL,
            C.INPUT_IDS,
            "INT64",
            np.zeros((1, 77), np.int64),
            bad,
            "data-type",
        ),
        (
            "ids outside the vocabulary to the text encoder",
            C.TEXT_MODEL,
            C.INPUT_IDS,
            "INT32",
            np.full((1, 77), 60_000, np.int32),
            bad,
            "token ids must lie in [0, 49408)",
        ),
        (
            "negative ids to the text encoder",
            C.TEXT_MODEL,
            C.INPUT_IDS,
            "INT32",
            np.full((1, 77), -1, np.int32),
            bad,
            "token ids",
        ),
        (
            "nan pixels to the vision encoder",
            C.VISION_MODEL,
            C.PIXELS,
            "FP32",
            np.full((1, 3, 32, 32), np.nan, np.float32),
            bad,
            "finite",
        ),
        # A few bytes declaring an extreme aspect ratio: the full resize would be 4,480,000 x 224 pixels.
        ("20000x1 png", *img, "BYTES", one(_encode(Image.new("RGB", (20_000, 1)), "PNG")), ok, ""),
        ("1x60000 png", *img, "BYTES", one(_encode(Image.new("L", (1, 60_000)), "PNG")), ok, ""),
        # A side past JPEG's own maximum is refused from the header (issue 27 row 6: 1 x 50,000,000).
        ("1x300000 png", *img, "BYTES", one(_encode(Image.new("L", (1, 300_000)), "PNG")), bad, "side over"),
        *[
            (
                f"{fmt.lower()} (not an accepted format)",
                *img,
                "BYTES",
                one(_encode(photo.convert(mode), fmt)),
                bad,
                "accepted format",
            )
            for fmt, mode in (
                ("PCX", "RGB"),
                ("SGI", "RGB"),
                ("TGA", "RGB"),
                ("XBM", "1"),
                ("ICO", "RGB"),
                ("JPEG2000", "RGB"),
                ("QOI", "RGB"),
                ("DDS", "RGB"),
                ("PPM", "RGB"),
                ("IM", "RGB"),
            )
        ],
    ]
    return [Case(*case) for case in cases]


class Case(NamedTuple):
    """One bad-input case: what is sent where, and what must come back."""

    label: str
    model: str  # the Triton model the request goes to
    tensor: str  # input tensor name
    datatype: str  # wire datatype sent
    array: np.ndarray
    status: str  # "ok" (answered) or the gRPC status expected
    fragment: str  # what the error message must say


CORPUS = _corpus()
# Cases the python models decide (decoder, tokenizer) run in-process against the very models Triton
# loads (`answer`, the pure half of their `execute`): the fast tier. These few also go end to end, as
# do the cases Triton itself or an encoder decides (datatypes, shapes, batch limits, token ids, pixels).
END_TO_END = {
    "zero bytes",
    "truncated jpeg",
    "png decompression bomb",
    "1x1 image",
    "one bad item in a batch",
    "invalid utf-8",
    "huge text",
}


def decided_by_a_front_model(case: Case) -> bool:
    """Bytes the preprocess or tokenizer model reads (shaped [n, 1], n within Triton's batch limit)."""
    within = case.array.shape[1:] == (1,) and case.array.shape[0] <= C.ModelContract.default().batch.max
    return (
        within
        and case.datatype == "BYTES"
        and (case.model, case.tensor)
        in (
            (C.IMAGE_ENSEMBLE, C.IMAGE_INPUT),
            (C.TEXT_ENSEMBLE, C.TEXT_INPUT),
        )
    )


IN_PROCESS = [case for case in CORPUS if decided_by_a_front_model(case)]
SERVED = [case for case in CORPUS if not decided_by_a_front_model(case) or case.label in END_TO_END]


@pytest.fixture(scope="module")
def front_models(tmp_path_factory):
    """The preprocess and tokenizer python models, initialised in-process from the configs `clip-triton
    repo --runtime python` writes (ViT-bigG-14's contract: no export needed)."""
    from .fakes import front_models

    return front_models(C.ModelContract.default(), tmp_path_factory.mktemp("front"))


@pytest.mark.parametrize("case", IN_PROCESS, ids=[case.label for case in IN_PROCESS])
def test_bad_input_corpus_in_the_front_models(front_models, case: Case):
    answer = front_models[case.model].answer(list(case.array.reshape(-1)))
    if case.status == "ok":
        assert answer.error is None, answer.error
        assert answer.rows is not None and len(answer.rows) == case.array.shape[0]
        if len(answer.statuses) > 1:  # a batch is answered whole, its bad item flagged
            assert [bool(s) for s in answer.statuses].count(True) == 1
        else:
            assert answer.statuses == [b""]
    else:
        assert answer.error is not None and answer.rows is None  # a single bad item fails its request
        assert case.fragment.lower() in answer.error.lower(), answer.error


def test_the_corpus_covers_both_tiers():
    assert len(IN_PROCESS) >= 35 and len(SERVED) >= 15
    assert {case.label for case in IN_PROCESS} >= END_TO_END


@pytest.mark.parametrize("case", SERVED, ids=[case.label for case in SERVED])
def test_bad_input_corpus(grpc, triton, case: Case):
    tensor = grpcclient.InferInput(case.tensor, list(case.array.shape), case.datatype)
    tensor.set_data_from_numpy(case.array)
    if case.status == "ok":
        result = grpc.infer(case.model, [tensor])
        out, status = result.as_numpy(C.EMBEDDING_OUTPUT), result.as_numpy(C.STATUS_OUTPUT)
        refused = np.zeros(len(out), bool) if status is None else status.reshape(-1) != b""
        assert out.shape == (case.array.shape[0], 32)
        assert np.isfinite(out[~refused]).all() and np.isnan(out[refused]).all()  # a refused row is NaN
    else:
        with pytest.raises(InferenceServerException) as err:
            grpc.infer(case.model, [tensor])
        assert err.value.status() == case.status, err.value.message()
        assert case.fragment.lower() in err.value.message().lower(), err.value.message()
    assert triton.ready()


def _infer_status(url: str, model: str, name: str, datatype: str, array: np.ndarray) -> str:
    client = grpcclient.InferenceServerClient(url)
    try:
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        client.infer(model, [tensor], client_timeout=300)
        return "ok"
    except InferenceServerException as exc:
        return str(exc.status())
    finally:
        client.close()


def test_hostile_requests_do_not_fail_their_batch_mates(triton):
    """72 concurrent requests, a third of them hostile: ids outside the vocabulary sent straight to the
    text encoder (co-batched with clip_text's own) and 1x300000 PNGs (a MemoryError in the full
    resize once; now refused from the header: a side over 65,535). Before, 37 and 48 of the 72 failed;
    now exactly the hostile ones do, and only them."""
    tall = np.array([[_encode(Image.new("L", (1, 300_000)), "PNG")]], dtype=object)
    photo = np.array([[png(3, (64, 48))]], dtype=object)
    text = np.array([[b"a photo of a cat"]], dtype=object)
    oov = np.full((1, 77), 60_000, np.int32)
    jobs = []
    for i in range(72):
        if i % 2:
            jobs.append(
                ("ok", C.TEXT_ENSEMBLE, C.TEXT_INPUT, "BYTES", text)
                if i % 3
                else ("StatusCode.INVALID_ARGUMENT", C.TEXT_MODEL, C.INPUT_IDS, "INT32", oov)
            )
        else:
            jobs.append(
                ("StatusCode.INVALID_ARGUMENT", C.IMAGE_ENSEMBLE, C.IMAGE_INPUT, "BYTES", tall)
                if i % 3 == 0
                else ("ok", C.IMAGE_ENSEMBLE, C.IMAGE_INPUT, "BYTES", photo)
            )
    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(lambda job: _infer_status(triton.grpc_url, *job[1:]), jobs))
    assert got == [job[0] for job in jobs]
    assert triton.ready()


class _FakeStubUtils:
    """Triton's ``triton_python_backend_utils`` exists only inside the python stub: the boundary this
    unit test replaces, to show any exception of one item stays in its own request."""

    class TritonError:
        INVALID_ARG = 3

        def __init__(self, message, code=None):
            self.message, self.code = message, code

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    class _Input:
        def __init__(self, array):
            self.array = array

        def as_numpy(self):
            return self.array

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return _FakeStubUtils._Input(request[name])


def test_any_item_failure_is_isolated_to_its_request(monkeypatch):
    import sys

    from clip_triton.serving.common import answer_items, respond

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _FakeStubUtils)

    def convert(item: bytes) -> np.ndarray:
        if item == b"oom":
            raise MemoryError("cannot allocate 15 GiB")
        if item == b"overflow":
            raise OverflowError("Python int too large to convert to C long")
        return np.zeros(2, np.float32)

    requests = [
        {"IMAGE": np.array([[b"ok"]], dtype=object)},
        {"IMAGE": np.array([[b"ok"], [b"oom"]], dtype=object)},
        {"IMAGE": np.array([[b"overflow"]], dtype=object)},
        {"IMAGE": np.array([[b"ok"]], dtype=object)},
    ]
    blank = np.ones(2, np.float32)
    responses = respond(requests, "IMAGE", "PIXELS", "STATUS", lambda v: answer_items(v, convert, (ValueError,), blank))
    assert [r.error is None for r in responses] == [True, True, False, True]
    pixels, status = responses[1].output_tensors  # answered whole: the failed item flagged, its row blank
    assert [bytes(x) for x in status.array.reshape(-1)][0] == b""
    assert bytes(status.array.reshape(-1)[1]).startswith(b"item 1: cannot be processed (MemoryError")
    assert (pixels.array[1] == 1).all() and (pixels.array[0] == 0).all()
    assert responses[2].error.code == _FakeStubUtils.TritonError.INVALID_ARG  # alone: the request fails
    assert "OverflowError" in responses[2].error.message


def test_probe_tells_dead_from_busy_without_a_server():
    """Nothing listening: dead, with the reason; a metrics URL that is unreachable or malformed is no
    evidence either way and never an exception."""
    from clip_triton.health import completed_requests, metrics_url_for, probe
    from clip_triton.server import free_port

    port = free_port()
    alive, reason = probe(f"127.0.0.1:{port}", f"http://127.0.0.1:{free_port()}/metrics", timeout=2)
    assert not alive and "cannot be reached" in reason
    assert completed_requests("http://127.0.0.1:1/metrics") is None
    assert completed_requests(metrics_url_for("dns:///clip-triton-triton-grpc:8001")) is None
    assert metrics_url_for("localhost:8001") == "http://localhost:8002/metrics"


def test_probe_reads_completed_requests_from_the_metrics(triton, grpc):
    """All models' successes, or only the named ones. The counters include warm-up at load (every
    bucket x batch size), so the encoders start above zero while no client asked for anything: a test
    that waited for "60 completed" stopped its server before its client had sent one request."""
    from clip_triton.health import completed_requests

    from .helpers import settled

    everything = lambda: completed_requests(triton.metrics_url)  # noqa: E731
    text = lambda: completed_requests(triton.metrics_url, models=(C.TEXT_ENSEMBLE,))  # noqa: E731
    before, asked = settled(everything), settled(text)  # the counters lag a response (tests.helpers.settled)
    warm = completed_requests(triton.metrics_url, models=(C.TEXT_MODEL, C.VISION_MODEL))
    assert warm >= len(C.TEXT_BUCKETS) + 1  # the warm-up is counted: never compare with a fixed number
    tensor = grpcclient.InferInput(C.TEXT_INPUT, [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[f"a photo of a cat {time.time_ns()}".encode()]], dtype=object))
    grpc.infer(C.TEXT_ENSEMBLE, [tensor])
    assert settled(everything, before + 3) >= before + 3  # ensemble, tokenizer, encoder
    assert settled(text, asked + 1) == asked + 1
    assert completed_requests(triton.metrics_url, models=(C.IMAGE_ENSEMBLE,)) is not None


def test_a_failed_canary_on_a_slowly_completing_server_is_busy_not_dead(triton):
    """A saturated server can take seconds per request: a canary deadline of 50 ms then sees no request
    complete inside its own window, and the watchdog restarted busy servers (every in-flight request
    died). Completions are now looked for over at least MIN_WINDOW_S, and since the previous probe.
    Here Triton's metrics come from a stand-in whose success counter moves once a second."""
    from clip_triton import health

    from .helpers import local_http_server

    started = time.monotonic()

    def metrics(path):
        count = int(time.monotonic() - started)  # one more completed request each second
        body = f'nv_inference_request_success{{model="clip_image",version="1"}} {count}\n'.encode()
        return 200, {"Content-Type": "text/plain"}, body

    with local_http_server(metrics) as base:
        url = f"{base}/metrics"
        alive, reason = health.probe(triton.grpc_url, url, timeout=0.0001)  # the canary cannot make it
        assert alive and reason.startswith("busy"), reason
        counter = {"completed": 0.0}  # the watchdog's window starts at its previous probe
        alive, reason = health.probe(triton.grpc_url, url, timeout=0.0001, counter=counter)
        assert alive and counter["completed"] >= 1, reason

    def frozen(path):
        return 200, {"Content-Type": "text/plain"}, b'nv_inference_request_success{model="clip_image",version="1"} 7\n'

    with local_http_server(frozen) as base:  # no completion in the whole window: evidence of death
        alive, reason = health.probe(triton.grpc_url, f"{base}/metrics", timeout=0.0001)
        assert not alive and "no request completed" in reason, reason
