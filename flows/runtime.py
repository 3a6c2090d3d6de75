"""Where the flows' Prefect runs go, set up before Prefect is imported.

With `PREFECT_API_URL` set (e.g. `prefect server start`), runs go to that server and appear
in its UI. Without it, Prefect would start a temporary local server itself, lazily, when the
flow begins: seconds of its imports and database start-up added to every run. We start that
same server (Prefect's API app under uvicorn, UI off, as Prefect's ephemeral mode does) as the
first thing the process does, so its start-up overlaps our imports, and point Prefect at it.
Its database lives under the run home's Prefect home unless the user set `PREFECT_HOME`.

Prefect reads its settings when it is imported, so `prepare()` must run before anything
imports it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlxchat.common import MlxchatError

STARTUP_TIMEOUT_S = 120.0

# The server's entry point: uvicorn, plus a watchdog that ends the server when its parent is
# gone, so a killed flow (SIGKILL skips exit handlers) never leaves a server holding the database.
_SERVE = """
import os, runpy, sys, threading, time
parent = os.getppid()
def watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
sys.argv = ["uvicorn", *sys.argv[1:]]
runpy.run_module("uvicorn", run_name="__main__")
"""
_server: "LocalServer | None" = None


def prepare(root: Path) -> None:
    """Set Prefect's environment for this run home; start the local server if none is configured."""
    global _server
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # Task results (the stage records) persist in the run home, so reruns in new processes hit the cache.
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(root / ".cache" / "prefect-results")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mlxchat")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if not os.environ.get("PREFECT_API_URL") and _server is None:
        _server = LocalServer()
        os.environ["PREFECT_API_URL"] = _server.api_url


def wait_until_ready() -> None:
    """Block until the local server (if we started one) answers; call just before the flow runs."""
    if _server is not None:
        _server.wait()


def finish(line: str, code: int) -> int:
    """Print the run's last line (stdout when it succeeded, else stderr) and return `code`,
    after sending what Prefect still queues (events, then logs): left to exit, Prefect sends it
    after that line and, on a busy machine, warns that items remain, so the line users (and
    tests) read as the outcome would not be the last one."""
    if "prefect.events.worker" in sys.modules:  # else no flow ran: nothing queued, no import to pay
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (EventsWorker, APILogWorker):
            service.drain_all(timeout=30)
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """Prefect's API server in a child process for the life of this one."""

    def __init__(self):
        self.port = _free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self._error: MlxchatError | None = None
        app_dir = Path(importlib.util.find_spec("prefect").origin).parent.parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, "--app-dir", str(app_dir), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        # Registered before Prefect is imported, so it runs after Prefect's own exit handlers
        # have flushed their logs and events to this server.
        atexit.register(self.stop)
        self._waiter = threading.Thread(target=self._wait_and_warm, name="prefect-server-ready", daemon=True)
        self._waiter.start()

    def wait(self) -> None:
        self._waiter.join()
        if self._error is not None:
            raise self._error

    def _wait_and_warm(self) -> None:
        """Poll until the server answers, then make the first API call (the client's version
        check, slow on a fresh server): both overlap the main thread's imports."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() or b"").decode(errors="replace").strip().splitlines()
                self._error = MlxchatError(f"Prefect's local server exited with code {self.process.returncode}: "
                                           f"{err[-1] if err else 'no output'}; set PREFECT_API_URL to a running server instead")
                return
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                self._error = MlxchatError(f"Prefect's local server did not start within {STARTUP_TIMEOUT_S:.0f} s; "
                                           "set PREFECT_API_URL to a running server instead")
                return
            time.sleep(0.1)
        try:
            urllib.request.urlopen(f"{self.api_url}/admin/version", timeout=30).close()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # only a warm-up: the client makes this call itself and reports failures

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
