"""`mlxchat serve` against requests meant to exhaust it (issue 15): a conversation of ~128k
tokens for a 128-token model, a 300 MB body, a full queue, clients that never read, pages of
other origins. After each, /health still answers.

The memory and body tests run the real `mlxchat serve` in its own process (bound to 0.0.0.0,
which must print one warning line) and read its peak RSS (VmHWM) from /proc; the queue and
timeout tests use a stand-in generation that never ends on its own, so what ends it is the
server's limit, not the model."""

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from chatrun import RUN, make_chat_run
from liveserver import LiveServer

from mlxchat import web
from mlxchat.chat_session import load_chat_model
from mlxchat.common import MlxchatError
from mlxchat.web import MAX_BODY_BYTES, GenerationWorker, create_app

EMOJI_CONVERSATION = {  # 5 messages x 6,400 emoji: within every character limit, ~128k tokens
    "messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "😀" * 6400} for i in range(5)],
    "temperature": 0.0,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_home")
    make_chat_run(root)
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(root, tmp_path_factory):
    """`mlxchat serve --host 0.0.0.0` in a process of its own: (url, pid, stderr path)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mlxchat.cli", "--home", str(root), "serve", "--run", RUN,
                                 "--host", "0.0.0.0", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, proc.pid, log
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def peak_rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def healthy(url: str) -> None:
    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"


def test_binding_every_address_prints_one_warning_line(served):
    _url, _pid, log = served
    warnings = [line for line in log.read_text().splitlines() if "anyone who can reach this machine" in line]
    assert len(warnings) == 1 and "0.0.0.0" in warnings[0]


@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's peak RSS from /proc")
def test_a_128k_token_conversation_is_answered_cut_to_the_context_in_bounded_memory(served, root):
    url, pid, _log = served
    tokenizer = load_chat_model(RUN, "sft", root).tokenizer
    assert sum(len(tokenizer.encode(m["content"])) for m in EMOJI_CONVERSATION["messages"]) > 100_000
    with httpx.stream("POST", f"{url}/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                      timeout=120) as r:
        events(r)  # a first reply: what serving costs at all
    before = peak_rss_mb(pid)
    with httpx.stream("POST", f"{url}/chat/completions", json=EMOJI_CONVERSATION, timeout=300) as r:
        assert r.status_code == 200
        got = events(r)
    after = peak_rss_mb(pid)
    assert got[0] == {"notice": "the conversation was cut to the model's context (64 prompt tokens): left out "
                                "the 4 oldest messages and the first 6385 characters of the last one"}
    assert got[-1] == {"done": True} and all("token" in e for e in got[1:-1])
    print(f"peak RSS {before:.0f} MB before, {after:.0f} MB after the 128k-token request")
    assert after - before < 150, (before, after)  # MB; uncut, the prefill alone took 9 GB
    healthy(url)


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _send_until_refused(sock: socket.socket, chunk: bytes, limit: int) -> int:
    sent = 0
    try:
        while sent < limit:
            sock.sendall(chunk)
            sent += len(chunk)
    except OSError:  # the server answered and closed: it stopped reading
        pass
    return sent


@pytest.mark.skipif(sys.platform != "linux", reason="reads the server's peak RSS from /proc")
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_300_mb_body_is_refused_before_it_is_read(served, framing):
    url, pid, _log = served
    before = peak_rss_mb(pid)
    size = 300 << 20
    sock = _raw(url)
    with sock:
        length = f"Content-Length: {size}" if framing == "content-length" else "Transfer-Encoding: chunked"
        sock.sendall(f"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"{length}\r\n\r\n".encode())
        payload = b"[" * (1 << 20)
        chunk = payload if framing == "content-length" else b"%x\r\n%s\r\n" % (len(payload), payload)
        sent = _send_until_refused(sock, chunk, size)
        sock.settimeout(30)
        reply = b""
        try:
            while b"\r\n\r\n" not in reply:
                data = sock.recv(65536)
                if not data:
                    break
                reply += data
        except OSError:
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 64 << 20  # the server hung up long before 300 MB (what was sent sat in socket buffers)
    assert peak_rss_mb(pid) - before < 50, (before, peak_rss_mb(pid))
    healthy(url)


# -- the queue and the timeouts, with a generation that only stops when told ---------------

class EndlessReplies:
    """Stands in for `stream_reply`: "endless" asks for a reply that never ends by itself
    (10 kB pieces, to fill a client's socket quickly), anything else gets "ok"."""

    def __init__(self):
        self.stopped = threading.Event()

    def __call__(self, chat, messages, temperature, top_k, max_tokens, cancelled=lambda: False):
        if messages[-1]["content"] != "endless":
            yield "ok"
            return
        while not cancelled():
            yield "x" * 10_000
            time.sleep(0.01)
        self.stopped.set()


@pytest.fixture
def endless(monkeypatch):
    replies = EndlessReplies()
    monkeypatch.setattr(web, "stream_reply", replies)
    return replies


def ask(text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4096}


def _wait_for_waiting(client, url: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while client.get(f"{url}/health").json()["waiting"] != n:
        assert time.monotonic() < deadline, f"never {n} waiting"
        time.sleep(0.05)


def test_a_full_queue_answers_503_with_retry_after_and_a_client_that_leaves_frees_its_place(root, endless):
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root), max_waiting=1)
    with LiveServer(create_app(worker)) as url, httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/chat/completions", json=ask("endless")) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the worker is busy with it
            with httpx.stream("POST", f"{url}/chat/completions", json=ask("hi"), timeout=60) as waiting:
                assert waiting.status_code == 200  # accepted: it waits in the queue
                _wait_for_waiting(client, url, 1)
                refused = client.post(f"{url}/chat/completions", json=ask("hi"))
                assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
                assert "busy" in refused.json()["detail"]
                healthy(url)
            _wait_for_waiting(client, url, 0)  # it left: its place is free while "endless" still runs
            assert not endless.stopped.is_set()
            with httpx.stream("POST", f"{url}/chat/completions", json=ask("hi"), timeout=60) as queued:
                assert queued.status_code == 200
                _wait_for_waiting(client, url, 1)
                running.close()  # the client of "endless" leaves: its generation is cancelled ...
                assert endless.stopped.wait(30)
                assert [e.get("token") for e in events(queued)] == ["ok", None]  # ... and the next one runs
        healthy(url)


def test_a_client_that_never_reads_is_dropped_and_its_generation_cancelled(root, endless):
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root))
    with LiveServer(create_app(worker, write_timeout_s=1.0)) as url:
        host, port = url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((host, int(port)))
        body = json.dumps(ask("endless")).encode()
        sock.sendall(b"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            assert endless.stopped.wait(120)  # never read from: the server gave up on it and cancelled
        finally:
            sock.close()
        with httpx.stream("POST", f"{url}/chat/completions", json=ask("hi"), timeout=60) as r:
            assert [e.get("token") for e in events(r)] == ["ok", None]
        healthy(url)


def test_a_stream_that_gets_nothing_ends_with_an_error_at_the_idle_timeout(root, endless):
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root))
    with LiveServer(create_app(worker, idle_timeout_s=1.0)) as url, httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/chat/completions", json=ask("endless")) as running:
            lines = running.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # the worker is busy with it
            with httpx.stream("POST", f"{url}/chat/completions", json=ask("hi"), timeout=60) as starved:
                got = events(starved)
        assert got == [{"error": "no reply within 1 s; try again later"}, {"done": True}]
        assert endless.stopped.wait(30)
        healthy(url)


# -- Host and Origin -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_url(root):
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root))
    with LiveServer(create_app(worker)) as url:
        yield url


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "https://evil.example", "Content-Type": "text/plain"},  # a form POST, no CORS preflight
    {"Origin": "null"},  # a sandboxed iframe or a file: page
    {"Host": "evil.example"},  # DNS rebinding: the attacker's name resolving to 127.0.0.1
    {"Host": "evil.example:8000", "Origin": "http://evil.example:8000"},
])
def test_requests_from_other_origins_or_hosts_are_refused(local_url, headers):
    body = json.dumps(ask("hi"))
    r = httpx.post(f"{local_url}/chat/completions", content=body, headers={"Content-Type": "application/json",
                                                                          **headers}, timeout=30)
    assert r.status_code == 403 and "allow-origin" in r.json()["detail"]
    assert httpx.get(f"{local_url}/", headers={"Host": "evil.example"}, timeout=30).status_code == 403
    healthy(local_url)


def test_the_servers_own_page_and_allowed_origins_are_answered(local_url, root):
    port = local_url.rsplit(":", 1)[1]
    for origin, host in [(local_url, None), (f"http://localhost:{port}", f"localhost:{port}")]:
        headers = {"Origin": origin, **({"Host": host} if host else {})}
        with httpx.stream("POST", f"{local_url}/chat/completions", json=ask("hi"), headers=headers, timeout=120) as r:
            assert r.status_code == 200 and events(r)[-1] == {"done": True}
    worker = GenerationWorker(lambda: load_chat_model(RUN, "sft", root))
    with LiveServer(create_app(worker, allow_origins=("https://chat.example",))) as url:
        ok = httpx.get(f"{url}/health", headers={"Origin": "https://chat.example"}, timeout=30)
        assert ok.status_code == 200
        assert httpx.get(f"{url}/health", headers={"Origin": "https://evil.example"}, timeout=30).status_code == 403
    healthy(local_url)


def test_serve_refuses_an_allow_origin_that_is_no_origin(root):
    with pytest.raises(MlxchatError, match="--allow-origin 'example.com' is not an origin"):
        web.serve(RUN, "sft", root=root, allow_origins=("example.com",))


def test_a_body_past_the_limit_without_content_length_is_refused_as_it_arrives(local_url):
    def body():
        for _ in range(64):
            yield b" " * (MAX_BODY_BYTES // 16)

    r = httpx.post(f"{local_url}/chat/completions", content=body(), timeout=30)
    assert r.status_code == 413 and "at most" in r.json()["detail"]
    healthy(local_url)


def test_fit_to_context_keeps_the_newest_turns_in_order_within_the_budget(root):
    from mlxchat.chat_session import fit_to_context, render_prompt

    tokenizer = load_chat_model(RUN, "sft", root).tokenizer
    conversation = [{"role": "system", "content": "Be brief."}]
    for i in range(6):
        conversation += [{"role": "user", "content": f"Question {i}: what is {i} * 7?"},
                         {"role": "assistant", "content": f"It is {i * 7}."}]
    conversation.append({"role": "user", "content": "And the capital of France?"})
    full = len(render_prompt(tokenizer, conversation))
    assert fit_to_context(tokenizer, conversation, full) == (conversation, full, None)
    for budget in range(full - 1, 4, -7):
        kept, length, note = fit_to_context(tokenizer, conversation, budget)
        assert length == len(render_prompt(tokenizer, kept)) <= budget
        turns = kept[1:] if kept[0]["role"] == "system" else kept
        assert [m["role"] for m in turns] == ["user", "assistant"] * (len(turns) // 2) + ["user"]
        assert conversation[-1]["content"].endswith(kept[-1]["content"])
        if len(turns) > 1:
            assert turns == conversation[-len(turns):]  # whole turns, the newest ones
        assert note and "left out" in note
