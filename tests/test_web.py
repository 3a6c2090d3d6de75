"""`mlxchat serve`: nanochat's streaming API over a real uvicorn server on 127.0.0.1, with a
tiny random chat model. Replies are greedy, so a streamed reply must equal the one
`stream_reply` gives in-process, which also shows that concurrent streams do not mix."""

import json
import threading

import httpx
import pytest
from chatrun import RUN, make_chat_run
from liveserver import LiveServer

from mlxchat.chat_session import load_chat_model, stream_reply
from mlxchat.common import MlxchatError
from mlxchat.web import MAX_BODY_BYTES, MAX_MESSAGE_LENGTH, GenerationWorker, RequestError, Sampling, create_app, parse_request

GREEDY = {"temperature": 0.0, "top_k": 50, "max_tokens": 16}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_home")
    make_chat_run(root)
    return root


@pytest.fixture(scope="module")
def url(root):
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root))
    with LiveServer(create_app(worker)) as url:
        yield url


def expected_reply(root, text: str) -> str:
    chat = load_chat_model(RUN, "sft", root)
    return "".join(stream_reply(chat, [{"role": "user", "content": text}], **GREEDY))


def events_of(response: httpx.Response) -> list[dict]:
    """The `data:` events of an SSE body; every non-empty line must be one."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [json.loads(line[len("data: "):]) for line in lines]


def ask(url: str, text: str) -> list[dict]:
    body = {"messages": [{"role": "user", "content": text}], **GREEDY}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return events_of(response)


def test_reply_streams_token_events_then_done(url, root):
    events = ask(url, "Hello there!")
    assert events[-1] == {"done": True}
    tokens = [e["token"] for e in events[:-1]]
    assert len(tokens) > 1 and all(isinstance(t, str) and t for t in tokens)
    assert "".join(tokens) == expected_reply(root, "Hello there!")


def test_page_and_health(url):
    page = httpx.get(f"{url}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/chat/completions" in page.text
    health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["status"] == "ok" and health["run"] == RUN and health["stage"] == "sft" and health["step"] == 1


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": ""}]}).encode(), 400, "non-empty string content"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, "non-empty string content"),
    (json.dumps({"messages": [{"role": "user", "content": "a" * (MAX_MESSAGE_LENGTH + 1)}]}).encode(), 400,
     f"at most {MAX_MESSAGE_LENGTH}"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}] * 501}).encode(), 400, "too many messages"),
    (json.dumps({"messages": USER + [{"role": "user", "content": "again"}]}).encode(), 400, "alternate"),
    (json.dumps({"messages": USER + [{"role": "assistant", "content": "yo"}]}).encode(), 400, "last message"),
    (json.dumps({"messages": USER, "temperature": 2.5}).encode(), 400, "temperature must be between"),
    (json.dumps({"messages": USER, "temperature": "hot"}).encode(), 400, "temperature must be a number"),
    (json.dumps({"messages": USER, "top_k": 0}).encode(), 400, "top_k must be between"),
    (json.dumps({"messages": USER, "top_k": 2.5}).encode(), 400, "top_k must be an integer"),
    (json.dumps({"messages": USER, "max_tokens": 4097}).encode(), 400, "max_tokens must be between"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": Infinity}', 400, "top_k must be an integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature must be a number"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
    (b" " * (MAX_BODY_BYTES + 1), 413, "bytes"),
])
def test_bad_requests_are_refused_with_a_message(url, body, status, message):
    response = httpx.post(f"{url}/chat/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=30)
    assert response.status_code == status
    assert message in response.json()["detail"]
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"


def test_accepted_settings_and_system_message():
    messages, sampling = parse_request(json.dumps({
        "messages": [{"role": "system", "content": "be brief"}, *USER, {"role": "assistant", "content": "hello"},
                     {"role": "user", "content": "2+2?"}],
        "temperature": 0, "top_k": 200, "max_tokens": 4096,
    }).encode(), Sampling())
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert sampling == Sampling(temperature=0.0, top_k=200, max_tokens=4096)
    assert parse_request(json.dumps({"messages": USER}).encode(), Sampling(0.3, 7, 9))[1] == Sampling(0.3, 7, 9)
    with pytest.raises(RequestError, match="first message"):
        parse_request(json.dumps({"messages": [*USER, {"role": "system", "content": "x"}]}).encode(), Sampling())


def test_concurrent_streams_complete_without_mixing(url, root):
    prompts = ["Hello there!", "What is 12 * 7?", "Paris is"]
    results: dict[str, list[dict]] = {}

    def client(text):
        results[text] = ask(url, text)

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == sorted(prompts)
    for text, events in results.items():
        assert events[-1] == {"done": True} and all(set(e) == {"token"} for e in events[:-1])
        assert "".join(e["token"] for e in events[:-1]) == expected_reply(root, text)


def test_client_leaving_midway_does_not_stop_the_server(url, root):
    body = {"messages": USER, "temperature": 0.0, "max_tokens": 4096}
    with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
        first = next(line for line in response.iter_lines() if line)
        assert "token" in json.loads(first[len("data: "):])
    events = ask(url, "Hello there!")
    assert events[-1] == {"done": True}
    assert "".join(e["token"] for e in events[:-1]) == expected_reply(root, "Hello there!")


def test_missing_checkpoint_fails_before_serving(tmp_path):
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(MlxchatError, match="no sft checkpoint yet.*mlxchat train sft --run empty"):
        GenerationWorker(lambda: load_chat_model("empty", "sft", tmp_path))


def test_serve_refuses_defaults_outside_the_request_limits(root):
    from mlxchat.web import serve

    with pytest.raises(MlxchatError, match="--top-k 500 is outside"):
        serve(RUN, "sft", root=root, defaults=Sampling(top_k=500))


class FailsOnce:
    """A model whose first forward pass raises (as an out-of-memory would), then works."""

    def __init__(self, model):
        self.model, self.config, self.compute_dtype = model, model.config, model.compute_dtype
        self.failed = False

    def __call__(self, idx, cache=None):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom")
        return self.model(idx, cache=cache)


def test_failed_generation_ends_its_stream_with_an_error_and_the_worker_goes_on(root):
    from dataclasses import replace

    def load():
        chat = load_chat_model(RUN, "sft", root)
        return replace(chat, model=FailsOnce(chat.model))

    with LiveServer(create_app(GenerationWorker(load))) as url:
        assert ask(url, "Hello there!") == [{"error": "generation failed: boom"}, {"done": True}]
        events = ask(url, "Hello there!")
    assert "".join(e["token"] for e in events[:-1]) == expected_reply(root, "Hello there!")
