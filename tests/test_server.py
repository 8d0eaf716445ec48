"""`flexinfer serve` end to end: the real server in a subprocess on a free port, SmolLM2, driven by the
official openai client (and raw httpx for what a client library will not send)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

# Imported here, not first inside a capsys test: bench/cli_synth.py's ProgressLine binds sys.stderr as
# a default argument at import, and capsys's stream is closed after the test that made it.
import flexinfer.bench.cli_synth  # noqa: E402, F401
from flexinfer.cli import main as cli_main  # noqa: E402

KEY = "test-key"
CTX = 512
LONG = CTX - 20  # ignore_eos generations that a client leaves: far longer than it waits
MAX_BODY = 65536
SYSTEM, USER = "Answer briefly.", "What is the capital of France?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model, tmp_path, *extra):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexinfer", "serve", str(model), "--port", str(self.port),
             "-c", str(CTX), "-t", "2", *extra], stdout=self.log, stderr=subprocess.STDOUT)
        self.health = []  # (status, body) seen while starting
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                r = httpx.get(self.url + "/health", timeout=5)
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.health.append((r.status_code, r.json()))
            if r.status_code == 200:
                return
            time.sleep(0.05)
        self.stop()  # a server that came up after all would follow the machine until killed
        raise AssertionError("the server did not become ready in 60 s:\n" + self.log_path.read_text())

    def client(self, key=KEY, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=180, **kw)

    def post(self, path, key=KEY, **kw) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kw.setdefault("timeout", 60)
        return httpx.post(self.url + path, headers={**headers, **kw.pop("headers", {})}, **kw)

    def metrics(self) -> dict:
        r = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    s = Server(smollm2_path, tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--parallel", "2",
               "--max-body", str(MAX_BODY))
    yield s
    s.stop()
    log = s.log_path.read_text()
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it: the exit status says SIGTERM
    assert s.proc.returncode in (0, -15) and "Traceback" not in log, log


def _m(metrics: dict, name: str, **labels) -> float:
    return metrics[(name, tuple(sorted(labels.items())))]


def test_health_was_503_while_loading_then_200(server):
    assert server.health[-1] == (200, {"status": "ok"})
    loading = [b for st, b in server.health if st == 503]
    assert loading, "the server answered before it listened with the model loading"
    assert loading[0]["error"]["code"] == "model_loading"


def test_models_lists_the_model(server):
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_chat_greedy_equals_run_chat_streamed_or_not(server, smollm2_path):
    run = subprocess.run([sys.executable, "-m", "flexinfer", "run", str(smollm2_path), "--chat",
                          "--system", SYSTEM, "-p", USER, "--temp", "0", "-n", "12", "-c", str(CTX),
                          "-t", "2", "--json"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = json.loads(run.stdout)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}]
    c = server.client()
    r = c.chat.completions.create(model="any", messages=msgs, temperature=0, max_tokens=12)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want["text"]
    assert r.usage.prompt_tokens == len(want["prompt_tokens"])
    assert r.usage.completion_tokens == len(want["tokens"])
    assert 0 <= r.usage.prompt_tokens_details.cached_tokens <= r.usage.prompt_tokens
    assert r.choices[0].finish_reason == ("length" if len(want["tokens"]) == 12 else "stop")
    chunks = list(c.chat.completions.create(model="any", messages=msgs, temperature=0,
                                            max_tokens=12, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want["text"]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(ch.usage is None for ch in chunks)  # no include_usage: no usage in the stream
    log = server.log_path.read_text().splitlines()
    assert sum(r.id in line and "tokens in" in line for line in log) == 1, log[-5:]


def test_completions_streamed_equals_whole_with_usage(server):
    c = server.client()
    kw = dict(model="m", prompt="Once upon a time", temperature=0, max_tokens=10)
    whole = c.completions.create(**kw)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 10
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    assert all(ch.usage is None for ch in chunks[:-1])


def test_stop_string_cuts_the_text_before_it(server):
    c = server.client()
    kw = dict(model="m", prompt="The capital of France is", temperature=0, max_tokens=12)
    text = c.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert len(stop) == 3, text
    want = text[:text.index(stop)]
    r = c.completions.create(**kw, stop=[stop, "never-seen-stop"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (want, "stop")
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(**kw, stop=stop,
                                                                         stream=True))
    assert streamed == want


def test_penalties_and_seed_reach_the_sampler(server):
    c = server.client()
    kw = dict(model="m", prompt="la la la la la la la la", temperature=0, max_tokens=8)
    plain = c.completions.create(**kw).choices[0].text
    assert c.completions.create(**kw, frequency_penalty=2.0).choices[0].text != plain
    assert c.completions.create(**kw, presence_penalty=2.0).choices[0].text != plain
    hot = dict(kw, temperature=1.5, top_p=1.0)
    a, b = (c.completions.create(**hot, seed=7).choices[0].text for _ in range(2))
    assert a == b


def test_eight_concurrent_clients_get_their_own_answers(server):
    c = server.client()
    prompts = [f"{i} plus {i} is" for i in range(8)]

    def ask(p):
        return c.completions.create(model="m", prompt=p, temperature=0, max_tokens=3).choices[0].text
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, prompts))
    assert together[:2] == [ask(p) for p in prompts[:2]]  # the same as one at a time
    assert len(set(together)) > 1


def test_client_dropping_mid_stream_cancels_its_sequence(server):
    c = server.client()
    before = server.metrics()
    others = []
    t = threading.Thread(target=lambda: others.append(c.completions.create(
        model="m", prompt="Hello", temperature=0, max_tokens=4)))
    stream = c.completions.create(model="m", prompt="Count:", temperature=0, max_tokens=LONG,
                                  stream=True, extra_body={"ignore_eos": True})
    got = [next(stream) for _ in range(3)]
    t.start()
    stream.close()  # the client goes away mid-stream
    t.join(60)
    assert got and others and others[0].usage.completion_tokens == 4  # the other client went on
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = server.metrics()
        if _m(m, "flexinfer_running_sequences") == 0 and _m(m, "flexinfer_queued_sequences") == 0:
            break
        time.sleep(0.1)
    assert _m(m, "flexinfer_running_sequences") == 0 and _m(m, "flexinfer_queued_sequences") == 0
    assert _m(m, "flexinfer_requests_cancelled_total") == \
        _m(before, "flexinfer_requests_cancelled_total") + 1
    made = _m(m, "flexinfer_completion_tokens_total") - _m(before, "flexinfer_completion_tokens_total")
    assert made < LONG + 4, "the dropped sequence ran on to max_tokens"
    # a non-streaming client that gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        server.post("/v1/completions", json={"prompt": "Count:", "max_tokens": LONG,
                                             "ignore_eos": True}, timeout=httpx.Timeout(30, read=1))
    deadline = time.monotonic() + 30
    while _m(m := server.metrics(), "flexinfer_requests_cancelled_total") < \
            _m(before, "flexinfer_requests_cancelled_total") + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _m(m, "flexinfer_requests_cancelled_total") == \
        _m(before, "flexinfer_requests_cancelled_total") + 2
    _wait_metric(server, "flexinfer_running_sequences", 0, cmp=lambda v, want: v <= want)
    made = _m(server.metrics(), "flexinfer_completion_tokens_total") - \
        _m(before, "flexinfer_completion_tokens_total")
    assert made < 2 * LONG, "the non-streaming request ran on after its client left"


def _error(r: httpx.Response, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize("body, param", [
    ({"messages": "hello"}, "messages"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": CTX + 1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}, "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "x " * (CTX + 100)}]}, "messages"),
])
def test_bad_chat_requests_get_400(server, body, param):
    _error(server.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"), ({"prompt": 7}, "prompt"), ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"), ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x " * (CTX + 100)}, "prompt"), ([1, 2], None),
])
def test_bad_completion_requests_get_400(server, body, param):
    err = _error(server.post("/v1/completions", json=body), 400, param)
    if isinstance(body, dict) and len(str(body.get("prompt"))) > CTX:
        assert err["code"] == "context_length_exceeded"


def test_malformed_oversize_and_unauthorized_requests(server):
    path = "/v1/chat/completions"
    for raw in (b"{", b"not json", b'{"messages": NaN}', b"\xff\xfe", b""):
        assert _error(server.post(path, content=raw), 400)["code"] == "invalid_json"
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    assert _error(server.post("/v1/completions", content=big), 413)["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit holds on the streamed body
        for _ in range(MAX_BODY // 1000 + 2):
            yield b" " * 1000
    assert _error(server.post(path, content=chunked()), 413)["code"] == "request_too_large"
    assert _error(server.post(path, key=None, json={}), 401)["code"] == "invalid_api_key"
    assert _error(server.post(path, key="wrong", json={}), 401)["code"] == "invalid_api_key"
    _error(server.post("/v1/nothing", json={}), 404)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.client().completions.create(model="m", prompt="x", max_tokens=0)
    # and the server goes on serving everyone
    r = server.client().completions.create(model="m", prompt="Hi", temperature=0, max_tokens=2)
    assert r.usage.completion_tokens == 2


def test_admin_budget(server):
    """The budget of the running model: bad sizes and sizes below the minimum are a 400 naming
    the problem, a good one re-plans (the stats and /metrics say so), "auto" hands it back to the
    environment; the server goes on serving throughout."""
    _error(server.post("/admin/budget", key=None, json={"memory_budget": "2GiB"}), 401)
    _error(server.post("/admin/budget", json={"memory_budget": "lots"}), 400, "memory_budget")
    _error(server.post("/admin/budget", json={"memory_budget": True}), 400, "memory_budget")
    _error(server.post("/admin/budget", json={}), 400, "memory_budget")
    low = _error(server.post("/admin/budget", json={"memory_budget": "20M"}), 400, "memory_budget")
    assert "minimum working set" in low["message"] and "GB" in low["message"]
    r = server.post("/admin/budget", json={"memory_budget": "2GiB"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["memory_budget_bytes"] == 2 << 30 and body["source"] == "server"
    assert body["change"]["new_bytes"] == 2 << 30 and body["stats"]["budget_source"] == "server"
    m = server.metrics()
    assert _m(m, "flexinfer_memory_budget_bytes") == 2 << 30
    assert _m(m, "flexinfer_memory_budget_info", source="server") == 1
    c = server.client()
    assert c.completions.create(model="m", prompt="Hi", temperature=0,
                                max_tokens=2).usage.completion_tokens == 2
    r = server.post("/admin/budget", json={"memory_budget": "auto"})
    assert r.status_code == 200 and r.json()["source"].startswith("auto: "), r.text
    assert c.completions.create(model="m", prompt="Hi", temperature=0,
                                max_tokens=2).usage.completion_tokens == 2


def test_metrics_are_prometheus_text(server):
    server.client().completions.create(model="m", prompt="Hi", temperature=0, max_tokens=3)
    m = server.metrics()
    assert _m(m, "flexinfer_model_loaded") == 1
    assert _m(m, "flexinfer_requests_total") >= 1
    assert _m(m, "flexinfer_completion_tokens_total") >= 3
    assert _m(m, "flexinfer_prompt_tokens_total") >= 1
    assert _m(m, "flexinfer_decode_tokens_per_second") > 0
    assert _m(m, "flexinfer_prefill_tokens_per_second") > 0
    assert _m(m, "flexinfer_resident_bytes") > 0 and _m(m, "flexinfer_memory_budget_bytes") > 0
    assert 0 <= _m(m, "flexinfer_cached_token_ratio") <= 1
    assert _m(m, "flexinfer_bytes_read_per_token") >= 0
    assert _m(m, "flexinfer_http_responses_total", status="200") >= 1
    assert _m(m, "process_resident_memory_bytes") > 10 ** 7


def _wait_metric(s: Server, name: str, value: float, within: float = 30,
                 cmp=lambda v, want: v >= want) -> None:
    deadline = time.monotonic() + within
    while not cmp(_m(s.metrics(), name), value):
        assert time.monotonic() < deadline, f"{name} did not reach {value} in {within} s"
        time.sleep(0.05)


def test_timeout_and_full_queue(smollm2_path, tmp_path):
    s = Server(smollm2_path, tmp_path, "--timeout", "4", "--max-queue", "1", "--parallel", "1",
               "-c", "4096")
    try:
        c = s.client()
        n = 4000  # far more than 4 s of tokens
        long = dict(model="m", prompt="Count:", temperature=0, max_tokens=n,
                    extra_body={"ignore_eos": True})
        stream = c.completions.create(**long, stream=True, stream_options={"include_usage": True})
        first = next(stream)
        _wait_metric(s, "flexinfer_running_sequences", 1)
        queued = []
        t = threading.Thread(target=lambda: queued.append(c.completions.create(**long)))
        t.start()
        _wait_metric(s, "flexinfer_queued_sequences", 1)
        r = s.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert _error(r, 503)["code"] == "queue_full" and r.headers["retry-after"] == "1"
        t0 = time.monotonic()
        rest = [first, *stream]
        t.join(60)
        assert time.monotonic() - t0 < 10
        assert rest[-2].choices[0].finish_reason == "length"
        assert rest[-1].usage.completion_tokens < n
        assert queued and queued[0].choices[0].finish_reason == "length"
        assert queued[0].usage.completion_tokens < n
        assert _m(s.metrics(), "flexinfer_requests_timed_out_total") == 2
        # SIGTERM with a stream open: the stream ends at the next step and the server exits
        _wait_metric(s, "flexinfer_running_sequences", 0, cmp=lambda v, want: v <= want)
        stream = c.completions.create(**long, stream=True)
        next(stream)
        t0 = time.monotonic()
        s.proc.terminate()
        rest = list(stream)
        assert rest and rest[-1].choices[0].finish_reason == "length"
        s.proc.wait(30)
        assert time.monotonic() - t0 < 10
        assert "Traceback" not in s.log_path.read_text(), s.log_path.read_text()
    finally:
        s.stop()


def test_serve_bad_options_exit_2_with_one_line(smollm2_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        in_use = str(taken.getsockname()[1])
        for args, says in ((["--port", "70000"], "--port"), (["--parallel", "0"], "--parallel"),
                           (["--timeout", "-1"], "--timeout"), (["--memory-budget", "lots"],
                                                                 "--memory-budget"),
                           (["--port", in_use], "cannot listen"), (["-c", "0"], "--ctx-size")):
            with pytest.raises(SystemExit) as e:
                cli_main(["serve", str(smollm2_path), *args])
            err = capsys.readouterr().err
            assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
