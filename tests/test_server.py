"""The OpenAI-compatible server (issue 14) as a client sees it: a real ``bitnet-runtime serve``
process on a tiny model, driven with the official ``openai`` client and raw HTTP.

What is asserted: the answers equal ``run``'s (greedy, token for token) whether a request is
alone or batched with others; streaming, stop strings, seeds, logprobs; the OpenAI error
shapes and statuses; limits (429), a client killed mid-stream freeing its slot, SIGTERM
draining the requests in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")

CONTEXT = 32768  # the tiny preset's 256 raised, so a long generation takes seconds
NAME = "tiny"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return dict(os.environ, BITNET_CACHE=str(tmp_path_factory.mktemp("cache")), TVM_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny(env, tmp_path_factory) -> tuple[Path, Path]:
    """(model, artifact): the tiny dummy with a 32768-token context, compiled for this CPU."""
    root = tmp_path_factory.mktemp("serve")
    for args in (["dummy", "tiny", "-o", str(root / "model")], ["-m", str(root / "model"), "-o", str(root / "art")]):
        done = subprocess.run([sys.executable, "-m", "bitnet_compile", *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    config = json.loads((root / "model" / "config.json").read_text())
    (root / "model" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": CONTEXT}))
    return root / "model", root / "art"


class Served:
    """A server process and clients for it."""

    def __init__(self, tiny: tuple[Path, Path], env: dict, *options: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        model, art = tiny
        cmd = [
            sys.executable,
            "-m",
            "bitnet_runtime",
            "serve",
            "-a",
            str(art),
            "-m",
            str(model),
            "--name",
            NAME,
            "--port",
            str(self.port),
            *options,
        ]
        self.log = art.parent / f"server-{self.port}.log"  # a file, not a pipe nobody drains
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(cmd, env=env, stderr=log, text=True, cwd=art)
        deadline = time.time() + 120
        while time.time() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise AssertionError("the server did not come up")
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def post(self, path: str, body, **kw) -> httpx.Response:
        content = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers={"content-type": "application/json"}, timeout=120, **kw)

    def metrics(self) -> dict[str, float]:
        lines = httpx.get(self.url + "/metrics", timeout=10).text.splitlines()
        return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(60)


@pytest.fixture(scope="module")
def server(tiny, env):
    s = Served(tiny, env, "--parallel", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(tiny, env):
    """The same model in this process: what ``run`` gives, to compare the server with."""
    from unittest import mock

    from bitnet_runtime.api import LLM

    with mock.patch.dict(os.environ, {"BITNET_CACHE": env["BITNET_CACHE"]}):
        return LLM(tiny[0], tiny[1], echo=lambda line: None)


def _run(llm, prompt, n: int) -> str:
    from bitnet_runtime.sampling import SamplingParams

    return llm.generate(prompt, n, SamplingParams(temperature=0)).text


def _complete(server: Served, prompt, n: int = 24, **kw):
    return server.client.completions.create(model=NAME, prompt=prompt, max_tokens=n, temperature=0, **kw)


def test_models_health_and_metrics(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "bitnet_queue_depth",
        "bitnet_time_to_first_token_seconds",
        "bitnet_inter_token_latency_seconds",
        "bitnet_generation_tokens_total",
    ):
        assert name in text


def test_a_greedy_completion_is_what_run_gives(server, llm):
    got = _complete(server, "hello world", 32)
    assert got.choices[0].text == _run(llm, "hello world", 32)
    assert got.usage.prompt_tokens == len(llm.tokenizer.encode("hello world"))
    assert got.choices[0].finish_reason in ("length", "stop") and got.usage.completion_tokens <= 32


def test_chat_renders_the_models_template(server, llm):
    from bitnet_runtime.sampling import SamplingParams

    got = server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hi there"}], max_tokens=20, temperature=0
    )
    want = llm.chat(SamplingParams(temperature=0)).send("hi there", 20)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text


@pytest.mark.parametrize("chat", [False, True])
def test_a_stream_adds_up_to_the_whole_answer(server, chat):
    kw = dict(model=NAME, max_tokens=30, temperature=0)
    if chat:
        kw["messages"] = [{"role": "user", "content": "stream me"}]
        whole = server.client.chat.completions.create(**kw).choices[0].message.content
        chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    else:
        kw["prompt"] = "stream me"
        whole = server.client.completions.create(**kw).choices[0].text
        chunks = list(server.client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        pieces = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(pieces) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= 30


def test_a_stop_string_ends_the_text_before_it(server):
    full = _complete(server, "stop here", 40).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3
    got = _complete(server, "stop here", 40, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in _complete(server, "stop here", 40, stop=stop, stream=True))
    assert streamed == got.choices[0].text


def test_seeded_sampling_is_reproducible(server):
    def sample(seed):
        return (
            server.client.completions.create(
                model=NAME, prompt="once", max_tokens=24, temperature=1.0, top_p=0.95, seed=seed, extra_body={"top_k": 50}
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_logprobs_are_log_probabilities_of_the_chosen_tokens(server):
    got = _complete(server, "hello", 8, logprobs=3).choices[0].logprobs
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs)
    for logprob, top in zip(got.token_logprobs, got.top_logprobs):
        assert logprob <= 0 and 1 <= len(top) <= 3  # tokens that decode alike share a key
        assert abs(max(top.values()) - logprob) < 1e-9  # greedy picks the most likely token
    chat = server.client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )
    for t in chat.choices[0].logprobs.content:
        assert len(t.top_logprobs) == 2 and t.logprob == t.top_logprobs[0].logprob <= 0
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


PROMPTS = [[502, *range(i, i + 3 + 5 * i)] for i in range(8)]  # token ids, lengths 3 to 38


def _batched_steps(server: Served) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("bitnet_decode_steps_total") and 'batch="1"' not in k)


def test_concurrent_greedy_requests_equal_one_at_a_time(server):
    """Token for token: the batched decode runs the decode step's kernels row by row. Long
    enough (200 tokens, through EOS) that the requests surely overlap on a fast machine."""
    run = lambda p: _complete(server, p, 200, logprobs=0, extra_body={"ignore_eos": True})  # noqa: E731
    one_by_one = [run(p) for p in PROMPTS]
    batched_before = _batched_steps(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(run, PROMPTS))
    assert _batched_steps(server) > batched_before  # they really were decoded together
    for alone, batched in zip(one_by_one, together):
        assert batched.choices[0].logprobs.tokens == alone.choices[0].logprobs.tokens
        assert batched.choices[0].text == alone.choices[0].text


def test_32_concurrent_clients_get_their_own_answers(server, llm):
    prompts = [[502, 7 * i % 500, (11 * i + 3) % 500, i] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda p: _complete(server, p, 12).choices[0].text, prompts))
    assert answers == [_run(llm, p, 12) for p in prompts]


@pytest.mark.parametrize(
    "path,body,status,kind",
    [
        ("/v1/completions", b"{not json", 400, "invalid_request_error"),
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "not_found_error"),
        ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "invalid_request_error"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": "hot"}, 400, "invalid_request_error"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "invalid_request_error"),
        ("/v1/completions", {"model": NAME, "prompt": "x", "echo": True}, 400, "invalid_request_error"),
        ("/v1/completions", {"model": NAME, "prompt": [1] * (CONTEXT + 10)}, 400, "invalid_request_error"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "' + b"x" * (5 << 20) + b'"}', 413, "invalid_request_error"),
        ("/v1/nothing", {}, 404, "not_found_error"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800 lone surrogate"}', 400, "invalid_request_error"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, "invalid_request_error"),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, kind):
    got = server.post(path, body)
    assert got.status_code == status, got.text
    error = got.json()["error"]
    assert error["type"] == kind and error["message"]


def test_a_too_long_prompt_says_so(server):
    got = server.post("/v1/completions", {"model": NAME, "prompt": [1] * (CONTEXT + 10)})
    assert got.json()["error"]["code"] == "context_length_exceeded"


def test_the_queue_limit_a_killed_client_and_sigterm(tiny, env):
    """One sequence, no queue: a second request while one runs is a 429; a client killed
    mid-stream frees the slot at once; SIGTERM lets the request in flight finish."""
    s = Served(tiny, env, "--parallel", "1", "--queue", "0")
    try:
        long = {"model": NAME, "prompt": "go", "max_tokens": CONTEXT - 10, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=120) as first:
            lines = first.iter_lines()  # kept: a dropped iterator would close the stream
            next(lines)  # it is running
            refused = s.post("/v1/completions", {"model": NAME, "prompt": "me too", "max_tokens": 4})
            assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        # the with-block closed the connection mid-stream: the slot must be free for the next one
        time.sleep(0.5)
        assert s.post("/v1/completions", {"model": NAME, "prompt": "me too", "max_tokens": 4}).status_code == 200
        killed = subprocess.Popen([sys.executable, "-c", _STREAM_FOREVER, s.url], stdout=subprocess.PIPE, text=True)
        assert killed.stdout.readline().strip() == "streaming"
        killed.kill()
        killed.wait()
        time.sleep(0.5)
        assert s.post("/v1/completions", {"model": NAME, "prompt": "after", "max_tokens": 4}).status_code == 200
        generated = s.metrics()["bitnet_generation_tokens_total"]
        assert generated < 2 * (CONTEXT - 10)  # neither cancelled stream ran to its end
        with httpx.stream("POST", s.url + "/v1/completions", json=long | {"max_tokens": 5000}, timeout=120) as draining:
            lines = draining.iter_lines()
            next(lines)
            s.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert s.process.wait(60) == 0
    finally:
        s.stop()


_STREAM_FOREVER = """
import sys, time, httpx
body = {"model": "tiny", "prompt": "go", "max_tokens": 4000, "temperature": 0, "stream": True, "ignore_eos": True}
with httpx.stream("POST", sys.argv[1] + "/v1/completions", json=body, timeout=120) as r:
    for line in r.iter_lines():
        print("streaming", flush=True)
        time.sleep(600)  # hold the connection until killed
"""


@pytest.mark.parametrize(
    "flags,message", [(["--parallel", "0"], "--parallel must be at least 1"), (["--port", "BUSY"], "cannot listen on")]
)
def test_bad_serve_options_are_one_line_errors(tiny, env, flags, message):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        flags = [str(busy.getsockname()[1]) if f == "BUSY" else f for f in flags]
        cmd = [sys.executable, "-m", "bitnet_runtime", "serve", "-a", str(tiny[1]), "-m", str(tiny[0]), *flags]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd=tiny[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: ") and message in done.stderr
