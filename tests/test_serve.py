"""A real server on 127.0.0.1, driven by the official openai client and by raw HTTP; nothing else is contacted."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from conftest import answer
from PIL import Image

from edgemed.backends.base import GenParams, texts
from edgemed.backends.pytorch import TorchBackend
from edgemed.errors import ArtifactError, ServeError
from edgemed.serve import ServeConfig, ask, check_config, create_app

QUESTION = "Is there a lesion in the left lung?"


# ---------------------------------------------------------------------------------------------- helpers
class Server:
    """uvicorn serving ``create_app(config, backend)`` on a free loopback port, in a thread."""

    def __init__(self, config: ServeConfig, backend):
        import uvicorn

        self.app = create_app(config, backend)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused", **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def metrics(self) -> dict:
        return httpx.get(f"{self.url}/metrics", timeout=10).json()

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.contextmanager
def serving(backend, **kw) -> Iterator[Server]:
    server = Server(ServeConfig(export_dir=backend.folder, **kw), backend)
    try:
        yield server
    finally:
        server.close()


def picture(seed: int, size=(40, 52)) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size[0], size[1], 3) * 255).astype("uint8"))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG whose header claims width x height pixels, with a few rows of data: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" + b"\x00" * width * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


class Slow:
    """A backend that takes ``delay`` seconds per piece: makes queueing, timeouts and cancellation observable."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay
        self.pieces = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, prompt, image=None, params=None):
        with contextlib.closing(self.inner.stream(prompt, image, params)) as it:
            for chunk in it:
                time.sleep(self.delay)
                self.pieces += 1
                yield chunk

    def generate(self, prompt, image=None, params=None):
        return texts(self.stream(prompt, image, params))


def direct(backend, question: str = QUESTION, image: Image.Image | None = None, **params) -> str:
    prompt = backend.render(question, image=image is not None)
    return "".join(backend.generate(prompt, image, GenParams(**params)))


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (on a busy 2-core runner, 2 threads are 10-30x slower); restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", autouse=True)
def loopback_only():
    """Every connection this module's process opens must go to loopback: a reach for a hub or a URL fails it."""
    import ipaddress

    attempts: list = []
    real = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if isinstance(host, str):
            try:
                ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
            except ValueError:
                ok = False
            if not ok:
                attempts.append(address)
                raise OSError(f"test: connection to {address} refused (loopback only)")
        return real(self, address)

    socket.socket.connect = guarded
    try:
        yield attempts
    finally:
        socket.socket.connect = real
    assert not attempts, f"the server or client tried to connect beyond loopback: {attempts}"


@pytest.fixture(scope="module")
def text_backend(tiny_model):
    b = TorchBackend(tiny_model("llama"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def image_backend(tiny_model):
    b = TorchBackend(tiny_model("llava"))
    yield b
    b.close()


@pytest.fixture(scope="module")
def text_server(text_backend):
    with serving(text_backend) as s:
        yield s


@pytest.fixture(scope="module")
def image_server(image_backend, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    with serving(image_backend, allow_dirs=[allowed], max_body_bytes=1 << 20) as s:
        s.allowed = allowed
        yield s


# ---------------------------------------------------------------------------------------------- answers
def test_text_question_equals_the_backend_for_the_same_prompt_and_seed(text_server, text_backend):
    client = text_server.client()
    for seed in (3, 4):
        r = client.chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=12, temperature=1.0, seed=seed)
        text, finish, tokens = answer(text_backend, text_backend.render(QUESTION), None,
                                      GenParams(max_tokens=12, temperature=1.0, seed=seed))
        assert r.choices[0].message.content == text
        assert r.choices[0].finish_reason == finish == "length"
        assert r.usage.completion_tokens == tokens == 12 and r.usage.prompt_tokens == len(
            text_backend.tokenize(text_backend.render(QUESTION)))
    assert direct(text_backend, max_tokens=12, temperature=1.0, seed=3) != direct(
        text_backend, max_tokens=12, temperature=1.0, seed=4)
    greedy = client.chat.completions.create(
        model="any", max_tokens=8, messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": QUESTION}])
    prompt = text_backend.render(QUESTION, system="Be brief.")
    assert greedy.choices[0].message.content == "".join(text_backend.generate(prompt, None, GenParams(max_tokens=8)))


def test_image_question_equals_the_backend_with_the_same_image(image_server, image_backend):
    img, other = picture(0), Image.new("RGB", (52, 40), "white")
    # a seed at which the image decides the answer, so that equality says the server used this image
    seed = next(s for s in range(50) if direct(image_backend, image=img, max_tokens=12, temperature=0.3, seed=s)
                != direct(image_backend, image=other, max_tokens=12, temperature=0.3, seed=s))
    r = image_server.client().chat.completions.create(
        model="any", messages=image_message(data_url(png_bytes(img))), max_tokens=12, temperature=0.3, seed=seed)
    assert r.choices[0].message.content == direct(image_backend, image=img, max_tokens=12, temperature=0.3, seed=seed)


def test_streamed_answer_arrives_in_pieces_and_equals_the_backend(image_server, image_backend):
    img = picture(2)
    stream = image_server.client().chat.completions.create(
        model="any", messages=image_message(data_url(png_bytes(img))), max_tokens=16, temperature=0.3, seed=9,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == direct(image_backend, image=img, max_tokens=16, temperature=0.3, seed=9)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_conversation_with_history_is_rendered_with_the_models_template(text_server, text_backend):
    from edgemed import prompting

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Is there a lesion?"},
            {"role": "assistant", "content": "Yes, in the left lung."}, {"role": "user", "content": QUESTION}]
    prompt = prompting.render(text_backend.processor, msgs)
    assert "Yes, in the left lung." in prompt and prompt.endswith(text_backend.render(QUESTION)[-30:])
    seed = next(s for s in range(50) if "".join(text_backend.generate(prompt, None, GenParams(
        max_tokens=10, temperature=0.3, seed=s))) != direct(text_backend, max_tokens=10, temperature=0.3, seed=s))
    r = text_server.client().chat.completions.create(model="m", messages=msgs, max_tokens=10, temperature=0.3,
                                                     seed=seed)
    assert r.choices[0].message.content == "".join(text_backend.generate(prompt, None, GenParams(
        max_tokens=10, temperature=0.3, seed=seed)))
    r = post(text_server, chat_body(msgs[:3]))  # ends with the assistant: nothing to answer
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_conversation"


def test_models_health_and_metrics(text_server):
    models = text_server.client().models.list()
    assert [m.id for m in models.data] == [text_server.app.state.edgemed.model_id]
    assert httpx.get(f"{text_server.url}/health").json()["status"] == "ok"
    before = text_server.metrics()
    text_server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4)
    after = text_server.metrics()
    assert after["requests_completed"] == before["requests_completed"] + 1
    assert after["tokens_generated"] > before["tokens_generated"]
    assert after["tokens_per_second"] > 0 and after["queue_depth"] == 0
    from prometheus_client.parser import text_string_to_metric_families

    prom = httpx.get(f"{text_server.url}/metrics?format=prometheus")
    assert prom.headers["content-type"].startswith("text/plain; version=0.0.4")
    values = {s.name: s.value for f in text_string_to_metric_families(prom.text) for s in f.samples}
    assert float(values["edgemed_requests_completed_total"]) >= after["requests_completed"]
    assert "edgemed_queue_depth" in values and "edgemed_tokens_per_second" in values
    assert values["edgemed_latency_seconds_count"] >= after["requests_completed"]


def test_each_app_counts_only_its_own_requests(text_backend):
    """Two apps in one process: their registries are their own (a shared one would refuse the second app)."""
    from fastapi.testclient import TestClient

    config = ServeConfig(export_dir=text_backend.folder)
    with TestClient(create_app(config, text_backend), base_url="http://127.0.0.1:8080") as a, TestClient(
            create_app(config, text_backend), base_url="http://127.0.0.1:8080") as b:
        r = a.post("/v1/chat/completions", content=chat_body([{"role": "user", "content": "hi"}], max_tokens=2),
                   headers={"content-type": "application/json"})
        assert r.status_code == 200, r.text
        assert a.get("/nowhere").status_code == 404
        ma, mb = a.get("/metrics").json(), b.get("/metrics").json()
    assert (ma["requests_total"], ma["requests_completed"], ma["requests_client_errors"]) == (1, 1, 1)
    assert (mb["requests_total"], mb["requests_completed"], mb["tokens_generated"]) == (0, 0, 0)


def test_local_image_path_only_under_an_allowed_folder(image_server, image_backend, tmp_path):
    img = picture(3)
    inside = image_server.allowed / "scan.png"
    inside.write_bytes(png_bytes(img))
    client = image_server.client()
    r = client.chat.completions.create(model="m", messages=image_message(inside.as_uri()), max_tokens=8,
                                       temperature=0.3, seed=1)
    assert r.choices[0].message.content == direct(image_backend, image=img, max_tokens=8, temperature=0.3, seed=1)
    outside = tmp_path / "scan.png"
    outside.write_bytes(png_bytes(img))
    import openai

    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="m", messages=image_message(outside.as_uri()), max_tokens=8)
    link = image_server.allowed / "link.png"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)  # a link inside the allowed folder that leads out of it
    for refused in (link, tmp_path / "absent.png"):  # outside: 403 whether or not the file exists
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="m", messages=image_message(refused.as_uri()), max_tokens=8)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="m", messages=image_message(str(image_server.allowed / "absent.png")),
                                       max_tokens=8)
    # the URL is never fetched: nothing is contacted (example.invalid cannot resolve in any case)
    with pytest.raises(openai.BadRequestError, match="offline"):
        client.chat.completions.create(model="m", messages=image_message("https://example.invalid/x.png"),
                                       max_tokens=8)


def test_ask_streams_what_the_backend_answers(tiny_model, image_backend, tmp_path):
    img = picture(4)
    path = tmp_path / "q.png"
    path.write_bytes(png_bytes(img))
    seed = next(s for s in range(50) if direct(image_backend, image=img, max_tokens=10, temperature=0.3, seed=s)
                != direct(image_backend, image=Image.new("RGB", (52, 40), "white"), max_tokens=10,
                          temperature=0.3, seed=s))
    pieces = list(ask(tiny_model("llava"), QUESTION, image=path, max_tokens=10, temperature=0.3, seed=seed))
    assert len(pieces) > 1
    assert "".join(pieces) == direct(image_backend, image=img, max_tokens=10, temperature=0.3, seed=seed)


def dicom_bytes(tmp_path, stored: np.ndarray, window: tuple[int, int]) -> bytes:
    """A 16-bit CT slice with a stored window, written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID, "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    path = tmp_path / "slice.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def test_dicom_image_is_windowed_as_in_training(image_server, image_backend, tmp_path):
    from edgemed.data import load_image

    stored = np.random.RandomState(0).randint(0, 2400, size=(48, 40))
    data = dicom_bytes(tmp_path, stored, (40, 400))
    trained_on = load_image(tmp_path / "slice.dcm")  # what fine-tuning saw
    assert trained_on.size == (40, 48)
    unwindowed = Image.fromarray((stored / stored.max() * 255).astype("uint8")).convert("RGB")
    seed = next(s for s in range(50) if direct(image_backend, image=trained_on, max_tokens=10, temperature=0.3, seed=s)
                != direct(image_backend, image=unwindowed, max_tokens=10, temperature=0.3, seed=s))
    r = image_server.client().chat.completions.create(
        model="m", messages=image_message(data_url(data, "application/dicom")), max_tokens=10, temperature=0.3,
        seed=seed)
    assert r.choices[0].message.content == direct(image_backend, image=trained_on, max_tokens=10, temperature=0.3,
                                                  seed=seed)


def test_a_verified_bundle_serves_and_a_tampered_one_is_refused(tiny_model, tmp_path):
    import shutil

    from edgemed.artifacts import write_manifest
    from edgemed.backends import open_model

    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    write_manifest(folder, "model", name="tiny")
    backend = open_model(folder, verify=True)  # verified, then opened from the manifest
    try:
        assert backend.name == "pytorch" and direct(backend, max_tokens=3)
    finally:
        backend.close()
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")
    with pytest.raises(ArtifactError, match="config.json"):
        open_model(folder, verify=True)
    open_model(folder, verify=False).close()  # --no-verify serves it anyway


def test_cli_ask_prints_the_streamed_answer(tiny_model, text_backend):
    from click.testing import CliRunner

    from edgemed.cli import main

    r = CliRunner().invoke(main, ["ask", str(tiny_model("llama")), QUESTION, "--max-tokens", "6"])
    assert r.exit_code == 0, r.output
    assert r.stdout == direct(text_backend, max_tokens=6) + "\n"
    r = CliRunner().invoke(main, ["serve", str(tiny_model("llama")), "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "api-key" in r.output


# ---------------------------------------------------------------------------------------------- load
def load(server: Server, clients: int, per_client: int, max_tokens: int) -> tuple[list, list]:
    """``clients`` threads, ``per_client`` requests each, started together: (answers, errors)."""
    import openai

    answers, errors, lock = [], [], threading.Lock()
    start = threading.Barrier(clients)

    def run(i: int) -> None:
        client = server.client()
        start.wait()
        for j in range(per_client):
            seed = i * per_client + j
            try:
                r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=max_tokens, temperature=1.0, seed=seed)
                with lock:
                    answers.append((seed, r.choices[0].message.content, r.choices[0].finish_reason))
            except openai.APIStatusError as e:
                with lock:
                    errors.append((seed, e.status_code, e.body))

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "the load test did not finish in 120 s"
    return answers, errors


def test_sixteen_clients_four_requests_each_all_answers_whole(text_backend):
    with serving(text_backend, max_queue=16) as server:
        t0 = time.time()
        answers, errors = load(server, 16, 4, max_tokens=8)
        took = time.time() - t0
        m = server.metrics()
    assert not errors  # 1 running + 16 waiting fits 16 clients: no 429 is implied
    assert len(answers) == 64
    for seed, text, finish in answers:
        assert (text, finish) == answer(text_backend, text_backend.render(QUESTION), None,
                                        GenParams(max_tokens=8, temperature=1.0, seed=seed))[:2], seed
    assert m["requests_completed"] == 64 and m["running"] == 0 and m["queue_depth"] == 0
    assert took < 120


def test_a_full_queue_answers_429_and_every_other_answer_is_whole(text_backend):
    slow = Slow(text_backend, 0.01)
    with serving(slow, max_queue=2) as server:
        answers, errors = load(server, 16, 4, max_tokens=8)
        m = server.metrics()
        assert httpx.get(f"{server.url}/health").status_code == 200
    assert errors, "16 clients against 1 slot and 2 waiting places must meet a full queue"
    assert {status for _, status, _ in errors} == {429}
    assert all(body["code"] == "queue_full" for _, _, body in errors)  # the openai client unwraps "error"
    assert len(answers) + len(errors) == 64
    assert m["requests_rejected_queue_full"] == len(errors)
    for seed, text, _ in answers:
        assert text == direct(text_backend, max_tokens=8, temperature=1.0, seed=seed), seed


# ---------------------------------------------------------------------------------------------- bad requests
def post(server: Server, body: bytes, **headers) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/chat/completions", content=body,
                      headers={"content-type": "application/json", **headers}, timeout=30)


def chat_body(messages, **kw) -> bytes:
    return json.dumps({"model": "m", "messages": messages, "max_tokens": 4, **kw}).encode()


BAD = {
    "malformed json": (b'{"model": "m", "messages": [', 400, "invalid_json"),
    "not an object": (b"[1, 2]", 400, "invalid_request"),
    "messages of the wrong type": (b'{"model": "m", "messages": "hello"}', 400, "invalid_request"),
    "max_tokens of the wrong type": (chat_body([{"role": "user", "content": "hi"}], max_tokens="ten"), 400,
                                     "invalid_request"),
    "temperature out of range": (chat_body([{"role": "user", "content": "hi"}], temperature=9), 400,
                                 "invalid_request"),
    "max_tokens over the cap": (chat_body([{"role": "user", "content": "hi"}], max_tokens=100000), 400,
                                "max_tokens_exceeded"),
    "bad base64": (chat_body(image_message("data:image/png;base64,@@not-base64@@")), 400, "invalid_base64"),
    "bytes that are no image": (chat_body(image_message(data_url(b"these bytes are not a picture" * 10))), 400,
                                "invalid_image"),
    "a 20000x20000 image": (chat_body(image_message(data_url(bomb_png()))), 413, "image_too_large"),
    "an oversized body": (chat_body([{"role": "user", "content": "x" * (2 << 20)}]), 413, "body_too_large"),
    "two images": (chat_body([{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(picture(0)))}},
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(picture(1)))}}]}]), 400, "too_many_images"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_a_4xx_json_error_and_the_server_lives_on(image_server, case):
    body, status, code = BAD[case]
    r = post(image_server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert httpx.get(f"{image_server.url}/health").json()["status"] == "ok"


def test_missing_or_wrong_api_key_is_401_and_health_stays_open(text_backend):
    import openai

    with serving(text_backend, api_key="s3cret") as server:
        for headers in ({}, {"authorization": "Bearer wrong"}):
            r = post(server, chat_body([{"role": "user", "content": "hi"}]), **headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{server.url}/v1/models").status_code == 401
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        r = server.client("s3cret").chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                            max_tokens=4)
        assert r.choices[0].message.content == direct(text_backend, "hi", max_tokens=4)
        assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_text_model_refuses_an_image(text_server):
    r = post(text_server, chat_body(image_message(data_url(png_bytes(picture(0))))))
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_not_supported"


# ---------------------------------------------------------------------------------------------- limits
def test_client_disconnect_stops_the_generation(text_backend):
    slow = Slow(text_backend, 0.02)
    with serving(slow, max_tokens_cap=400) as server:
        body = chat_body([{"role": "user", "content": QUESTION}], max_tokens=400, temperature=1.0, seed=1,
                         stream=True)
        with httpx.Client(timeout=30) as client, client.stream(
                "POST", f"{server.url}/v1/chat/completions", content=body,
                headers={"content-type": "application/json"}) as r:
            lines = r.iter_lines()
            got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")]
        assert len(got) >= 3
        deadline = time.time() + 5
        while server.metrics()["running"] and time.time() < deadline:
            time.sleep(0.05)
        m = server.metrics()
        assert m["running"] == 0 and m["requests_cancelled"] == 1
        stopped_at = slow.pieces
        assert stopped_at < 100  # 400 pieces would take 8 s
        time.sleep(0.3)
        assert slow.pieces == stopped_at  # nothing runs on after the stop
        # and the non-streamed path: a request abandoned mid-answer frees the slot as well
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{server.url}/v1/chat/completions", timeout=0.3,
                       content=chat_body([{"role": "user", "content": QUESTION}], max_tokens=400),
                       headers={"content-type": "application/json"})
        deadline = time.time() + 5
        while server.metrics()["running"] and time.time() < deadline:
            time.sleep(0.05)
        assert server.metrics()["running"] == 0 and server.metrics()["requests_cancelled"] == 2
        assert slow.pieces < stopped_at + 100


def test_a_client_that_leaves_the_queue_gives_its_place_back(text_backend):
    slow = Slow(text_backend, 0.02)
    with serving(slow, max_queue=1, max_tokens_cap=400) as server:
        body = chat_body([{"role": "user", "content": QUESTION}], max_tokens=100)
        holder = threading.Thread(target=post, args=(server, body), daemon=True)
        holder.start()  # holds the one slot for about 2 s
        deadline = time.time() + 5
        while server.metrics()["running"] == 0 and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):  # waits in the queue, then gives up
            httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=0.3,
                       headers={"content-type": "application/json"})
        deadline = time.time() + 5
        while server.metrics()["queue_depth"] and time.time() < deadline:
            time.sleep(0.02)
        assert server.metrics()["queue_depth"] == 0  # the place is free again...
        r = post(server, chat_body([{"role": "user", "content": QUESTION}], max_tokens=2))  # ...and usable
        assert r.status_code == 200
        holder.join(30)
        m = server.metrics()
        assert m["requests_completed"] == 2 and m["requests_cancelled"] == 1 and m["running"] == 0


def test_request_timeout_answers_504(text_backend):
    slow = Slow(text_backend, 0.05)
    with serving(slow, request_timeout=0.5, max_tokens_cap=400) as server:
        t0 = time.time()
        r = post(server, chat_body([{"role": "user", "content": QUESTION}], max_tokens=400))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.time() - t0 < 3
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_settings_that_would_expose_the_model_are_refused(tmp_path):
    with pytest.raises(ServeError, match="api-key"):
        check_config(ServeConfig(export_dir=tmp_path, host="0.0.0.0"))
    check_config(ServeConfig(export_dir=tmp_path, host="0.0.0.0", api_key="k"))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_config(ServeConfig(export_dir=tmp_path, host=host))
    with pytest.raises(ServeError, match="max-queue"):
        check_config(ServeConfig(export_dir=tmp_path, max_queue=-1))


def test_a_folder_that_is_no_model_is_refused(tmp_path):
    from edgemed.backends import open_model

    with pytest.raises(ArtifactError, match="neither"):
        open_model(tmp_path)


def test_gguf_export_served_through_llama_cpp_equals_its_backend(tiny_model, tmp_path):
    pytest.importorskip("llama_cpp")
    from edgemed.backends import open_model
    from edgemed.export.gguf import export_gguf

    out = export_gguf(tiny_model("llava"), ["f32"], tmp_path / "gguf")
    backend = open_model(out, n_threads=2)  # verified, then the runtime its manifest names
    try:
        assert backend.name == "llamacpp" and backend.is_vision
        with serving(backend) as server:
            client = server.client()
            r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=10, temperature=1.0, seed=4)
            assert r.choices[0].message.content == direct(backend, max_tokens=10, temperature=1.0, seed=4)
            img = picture(8)
            stream = client.chat.completions.create(model="m", messages=image_message(data_url(png_bytes(img))),
                                                    max_tokens=10, temperature=1.0, seed=4, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == direct(backend, image=img, max_tokens=10, temperature=1.0, seed=4)
    finally:
        backend.close()


def test_onnx_export_served_through_onnxruntime_equals_its_backend(tiny_model, tmp_path):
    pytest.importorskip("onnxruntime")
    from edgemed.backends import open_model
    from edgemed.export.onnx import export_onnx

    out = export_onnx(tiny_model("llama"), "fp32", tmp_path / "onnx")
    backend = open_model(out)
    try:
        assert backend.name == "onnx"
        with serving(backend) as server:
            stream = server.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=1.0, seed=6,
                stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == direct(backend, max_tokens=10, temperature=1.0, seed=6)
            assert text != direct(backend, max_tokens=10, temperature=1.0, seed=7)
    finally:
        backend.close()


# ---------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_embedded_image_model_served_equals_its_backend(embedded_image):
    from edgemed.backends import open_model

    # from its manifest; unverified: a cache made before manifests were sealed must still serve in this test
    backend = open_model(embedded_image, verify=False)
    try:
        with serving(backend) as server:
            client = server.client()
            img = picture(5, (96, 80))
            r = client.chat.completions.create(model="m", messages=image_message(data_url(png_bytes(img)),
                                                                                 "Describe the image."),
                                               max_tokens=16, temperature=0.7, seed=2)
            assert r.choices[0].message.content == direct(backend, "Describe the image.", img, max_tokens=16,
                                                          temperature=0.7, seed=2)
            stream = client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == direct(backend, "What is the capital of France?", max_tokens=24)
            assert "Paris" in text
    finally:
        backend.close()


def test_max_concurrency_opens_a_replica_per_slot_and_answers_stay_whole(tiny_model, tmp_path, monkeypatch):
    """Two slots over an ONNX export the server opens itself: two model instances, each generating in its own
    thread at the same time as the other (replicas slowed to 20 ms a piece so that the overlap is certain), and
    every answer equal to a single backend's."""
    pytest.importorskip("onnxruntime")
    import edgemed.serve.models as serve_models
    from edgemed.backends import open_model
    from edgemed.export.onnx import export_onnx

    out = export_onnx(tiny_model("llama"), "fp32", tmp_path / "onnx")
    reference = open_model(out)
    active, peak, lock = [0], [0], threading.Lock()

    class Counted(Slow):
        def stream(self, prompt, image=None, params=None):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                yield from super().stream(prompt, image, params)
            finally:
                with lock:
                    active[0] -= 1

    monkeypatch.setattr(serve_models, "open_model", lambda *a, **k: Counted(open_model(*a, **k), 0.02))
    server = Server(ServeConfig(export_dir=out, max_concurrency=2, max_queue=8), None)
    try:
        state = server.app.state.edgemed
        assert len(state.models.all) == 2 and state.models.all[0].inner is not state.models.all[1].inner
        assert state.gate.slots == 2 and server.metrics()["max_concurrency"] == 2
        results: dict[int, str] = {}

        def ask_one(seed: int) -> None:
            r = server.client().chat.completions.create(
                model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=12, temperature=1.0,
                seed=seed)
            results[seed] = r.choices[0].message.content

        askers = [threading.Thread(target=ask_one, args=(seed,)) for seed in (1, 2, 3, 4)]
        for t in askers:
            t.start()
        for t in askers:
            t.join(60)
        assert peak[0] == 2, f"at most {peak[0]} generation(s) at once"
        assert sorted(results) == [1, 2, 3, 4]
        for seed, text in results.items():
            assert text == direct(reference, max_tokens=12, temperature=1.0, seed=seed), seed
    finally:
        server.close()
        reference.close()


# ---------------------------------------------------------------------------------------------- base models
@pytest.fixture(scope="module")
def base_backend(tiny_model, tmp_path_factory):
    from conftest import base_model

    b = TorchBackend(base_model(tiny_model("llama"), tmp_path_factory.mktemp("base") / "llama-base"))
    yield b
    b.close()


def test_base_model_completions_continue_the_plain_prompt(base_backend):
    import openai

    text = "The chest radiograph shows"
    want = "".join(base_backend.generate(text, None, GenParams(max_tokens=10)))
    assert base_backend.render(text) == text  # no template: the prompt is the text itself
    with serving(base_backend) as s:
        client = s.client()
        r = client.completions.create(model="any", prompt=text, max_tokens=10)
        assert r.object == "text_completion" and r.choices[0].text == want
        assert r.usage.prompt_tokens == len(base_backend.tokenize(text))
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="any", prompt=text, max_tokens=10, stream=True))
        assert streamed == want
        echo = client.completions.create(model="any", prompt=text, max_tokens=10, echo=True)
        assert echo.choices[0].text == text + want
        with pytest.raises(openai.BadRequestError, match="no chat template.*/v1/completions"):
            client.chat.completions.create(model="any", messages=[{"role": "user", "content": text}], max_tokens=4)
        with pytest.raises(openai.BadRequestError, match="one prompt per request"):
            client.completions.create(model="any", prompt=["a", "b"], max_tokens=4)


def test_chat_template_file_gives_a_base_model_chat(base_backend, text_backend, tmp_path):
    from click.testing import CliRunner

    from edgemed.backends import use_template
    from edgemed.cli import main
    from edgemed.prompting import read_template

    path = tmp_path / "chat.jinja"
    path.write_text(text_backend.chat_template())
    template = read_template(path)
    b = use_template(TorchBackend(base_backend.folder), template)
    try:
        with serving(b) as s:
            r = s.client().chat.completions.create(model="any", messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=6)
        assert r.choices[0].message.content == direct(b, max_tokens=6)
        assert b.render(QUESTION) == text_backend.render(QUESTION)
    finally:
        b.close()
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    res = CliRunner().invoke(main, ["ask", str(base_backend.folder), "hi", "--chat-template", str(bad)])
    assert res.exit_code != 0 and "not a valid Jinja template" in res.output and "Traceback" not in res.output


def test_ask_on_a_base_model_continues_the_text(base_backend):
    text = "Magnetic resonance imaging of the brain"
    want = "".join(base_backend.generate(text, None, GenParams(max_tokens=8)))
    assert want and "".join(ask(base_backend.folder, text, max_tokens=8)) == want


# ---------------------------------------------------------------------------------------------- adapters
@pytest.fixture(scope="module")
def adapter_exports(tiny_model, tmp_path_factory):
    """A GGUF base export of the tiny llama, two adapter exports of runs trained from it (LoRA B non-zero, made
    large so that each adapter changes the answers), and one of a run trained from another base."""
    pytest.importorskip("llama_cpp")
    from test_export_gguf_adapter import _amplify, train_run

    from edgemed.export.gguf import export_gguf

    tmp = tmp_path_factory.mktemp("adapters")
    out = {"base": export_gguf(tiny_model("llama"), ["f32"], tmp / "base")}
    for name, model, seed in (("a", tiny_model("llama"), 3), ("b", tiny_model("llama"), 7),
                              ("wrong", tiny_model("llama", seed=1), 3)):
        run = train_run(model, tmp, {"decoder": "lora"}, name=f"run-{name}", seed=seed)
        _amplify(run, 40.0)
        out[name] = export_gguf(run, ["f32"], tmp / f"gguf-{name}", adapter_quant="f32")
    return out


QUESTIONS = [QUESTION, "Which side of the image is bright?"]


def test_adapters_are_models_and_answer_as_the_backends_with_adapter(adapter_exports):
    """model=NAME answers as ``with_adapter(NAME)`` on the same base, the base id as the bare base (which differs),
    and an unknown name is a 404 that lists the models."""
    import openai

    from edgemed.backends import open_model

    ref = open_model(adapter_exports["base"], n_threads=1)
    try:
        for name in ("a", "b"):
            ref.add_adapter(name, adapter_exports[name])
        params = GenParams(max_tokens=8, temperature=1.0, seed=5)
        want = {m: ["".join(v.generate(v.render(q), None, params)) for q in QUESTIONS]
                for m, v in (("base", ref), ("a", ref.with_adapter("a")), ("b", ref.with_adapter("b")))}
    finally:
        ref.close()
    assert want["a"] != want["base"] and want["b"] != want["base"] and want["a"] != want["b"]
    config = ServeConfig(export_dir=adapter_exports["base"], n_threads=1,
                         adapters={"a": adapter_exports["a"], "b": adapter_exports["b"]})
    server = Server(config, None)  # opened, verified and given its adapters by the server
    try:
        base_id = server.app.state.edgemed.model_id
        client = server.client()
        assert [m.id for m in client.models.list().data] == [base_id, "a", "b"]
        for model, key in ((base_id, "base"), ("a", "a"), ("b", "b"), ("b", "b"), ("a", "a")):
            got = []
            for q in QUESTIONS:
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                                   max_tokens=8, temperature=1.0, seed=5)
                assert r.model == model
                got.append(r.choices[0].message.content)
            assert got == want[key], model
        stream = client.chat.completions.create(model="b", messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                max_tokens=8, temperature=1.0, seed=5, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want["b"][1]
        with pytest.raises(openai.NotFoundError, match=f"'c' is not served here.*{base_id}, a, b") as e:
            client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert e.value.body["code"] == "model_not_found"
    finally:
        server.close()


def test_an_adapter_for_another_base_is_refused_before_listening(adapter_exports, text_backend, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgemed.artifacts import read_manifest
    from edgemed.cli import main
    from edgemed.serve.models import model_id

    base = adapter_exports["base"]
    with pytest.raises(ServeError, match="--adapter wrong=.*made for base"):
        create_app(ServeConfig(export_dir=base, n_threads=1, adapters={"wrong": adapter_exports["wrong"]}))
    with pytest.raises(ServeError, match="needs a GGUF base export"):
        create_app(ServeConfig(export_dir=text_backend.folder, adapters={"a": adapter_exports["a"]}), text_backend)
    with pytest.raises(ServeError, match="is the base model's id"):
        create_app(ServeConfig(export_dir=base, n_threads=1, adapters={model_id(base): adapter_exports["a"]}))
    tampered = shutil.copytree(adapter_exports["a"], tmp_path / "tampered")
    victim = tampered / next(f for f in read_manifest(tampered)["files"] if f.endswith(".json"))
    victim.write_text(victim.read_text() + " ")
    with pytest.raises(ServeError, match="fails verification"):
        create_app(ServeConfig(export_dir=base, n_threads=1, adapters={"t": tampered}))
    for spec in ("a", "=x", f"two words={adapter_exports['a']}"):
        r = CliRunner().invoke(main, ["serve", str(base), "--adapter", spec])
        assert r.exit_code == 2 and "is not NAME=DIR" in r.output and "Traceback" not in r.output, r.output
    r = CliRunner().invoke(main, ["serve", str(base), "--adapter", f"a={adapter_exports['a']}", "--adapter",
                                  f"a={adapter_exports['b']}"])
    assert r.exit_code == 2 and "given twice" in r.output, r.output


class Seen:
    """A backend that records the images it is handed (the rest is the inner backend's)."""

    def __init__(self, inner):
        self.inner, self.images = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, prompt, image=None, params=None):
        self.images.append(image)
        return self.inner.stream(prompt, image, params)

    def generate(self, prompt, image=None, params=None):
        return texts(self.stream(prompt, image, params))


def test_a_ct_dicom_is_rendered_as_the_served_family_was_trained(tiny_model, tmp_path, monkeypatch):
    """MedGemma's family trains on CT as three Hounsfield windows: serve and ask render a CT upload the same way,
    not with the file's own window, which another family uses."""
    from pydicom import examples

    import edgemed.serve.app as app_mod
    from edgemed.data import load_image
    from edgemed.serve import ask

    path = tmp_path / "ct.dcm"
    examples.ct.save_as(path, enforce_file_format=True)
    windows, own = load_image(path, render="ct-windows"), load_image(path)
    assert np.asarray(windows).tobytes() != np.asarray(own).tobytes()  # the two renderings differ on this slice
    backend = Seen(TorchBackend(tiny_model("gemma3")))
    assert backend.arch.dicom_render == "ct-windows"
    try:
        with serving(backend) as server:
            r = post(server, chat_body(image_message(data_url(path.read_bytes(), "application/dicom")), max_tokens=2))
            assert r.status_code == 200, r.text
        monkeypatch.setattr(app_mod, "open_model", lambda *a, **k: backend)
        monkeypatch.setattr(backend.inner, "close", lambda: None)
        "".join(ask(tiny_model("gemma3"), QUESTION, image=path, max_tokens=2))
        assert len(backend.images) == 2
        for seen in backend.images:
            assert np.asarray(seen).tobytes() == np.asarray(windows).tobytes()
    finally:
        backend.inner.close()
