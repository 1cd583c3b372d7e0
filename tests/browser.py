"""Open a local HTML page in headless Chromium, for tests of the pages attnlab writes.

    page = open_page(path, probe="...js...")   # pytest.skip when chromium is not installed
    screenshot(path, "shot.png", selector="#headline")  # what a reader sees, as a PNG
    assert page.errors == []                   # console.error/assert, uncaught exceptions, failed loads
    assert 'id="probe"' in page.dom            # the DOM after the page's scripts (and the probe) ran

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it
reads commands on fd 3 and writes replies and events on fd 4, one JSON message per
NUL-terminated record), which tells a console.error from a console.log, unlike the
text log of --enable-logging. `probe` is JavaScript run by an inline <script> added at
the end of a copy of the page (written beside it, then removed): it can check what
only a browser knows (an image decoded, its naturalWidth) and write a marker into the
DOM. The returned DOM is `document.documentElement.outerHTML` after the load event,
what --dump-dom prints.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--remote-debugging-pipe",
)
LOCAL_SCHEMES = ("data:", "file:", "about:", "blob:")


def find_chromium() -> str | None:
    """The Chromium executable: $ATTNLAB_CHROMIUM, else the first of CANDIDATES on PATH."""
    chosen = os.environ.get("ATTNLAB_CHROMIUM")
    if chosen:
        return chosen
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Page:
    """What the browser saw: the DOM after scripts ran, errors, every console message, requested URLs."""

    dom: str
    errors: list[str] = field(default_factory=list)
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text) of every console call
    requests: list[str] = field(default_factory=list)

    @property
    def remote_requests(self) -> list[str]:
        """Requests for anything but inline data and local files (a self-contained page makes none)."""
        return [url for url in self.requests if not url.startswith(LOCAL_SCHEMES)]


class _DevTools:
    """A DevTools protocol connection over Chromium's debugging pipe."""

    def __init__(self, proc: subprocess.Popen[bytes], to_chrome: int, from_chrome: int) -> None:
        self.proc, self.to_chrome, self.from_chrome = proc, to_chrome, from_chrome
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        return self.next_id

    def receive(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.from_chrome], [], [], remaining)
            if ready:
                chunk = os.read(self.from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed its debugging pipe (exit status {self.proc.poll()})")
                self.buffer += chunk
        record, _, self.buffer = self.buffer.partition(b"\0")
        return json.loads(record)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             *, timeout: float = 30.0) -> dict[str, Any]:
        """Send a command and wait for its reply; events received meanwhile are kept in `events`."""
        wanted = self.send(method, params, session)
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"DevTools {method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, session: str, *, timeout: float = 30.0) -> None:
        """Wait until the event `method` of `session` arrives (or has arrived)."""
        deadline = time.monotonic() + timeout
        if any(e["method"] == method and e.get("sessionId") == session for e in self.events):
            return
        while True:
            message = self.receive(deadline)
            if "method" in message:
                self.events.append(message)
                if message["method"] == method and message.get("sessionId") == session:
                    return


def _text(args: list[dict[str, Any]]) -> str:
    return " ".join(str(a.get("value", a.get("description", a.get("type", "")))) for a in args)


def _collect(events: list[dict[str, Any]], page: Page) -> None:
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = _text(params.get("args", []))
            page.console.append((params.get("type", ""), text))
            if params.get("type") in ("error", "assert"):
                page.errors.append(f"console.{params['type']}: {text}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            description = details.get("exception", {}).get("description") or details.get("text", "")
            page.errors.append(f"uncaught: {description}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") == "error":
                page.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".rstrip())
        elif method == "Network.requestWillBeSent":
            page.requests.append(params.get("request", {}).get("url", ""))


def _above(fd: int, low: int) -> int:
    """`fd` moved to a number >= low (close-on-exec), so that making fds 3 and 4 cannot clobber it."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low)
    os.close(fd)
    return moved


def with_probe(path: Path, probe: str) -> Path:
    """A copy of the page beside it with `probe` run by an inline script at the end of the body."""
    text = path.read_text(encoding="utf-8")
    script = f"<script>{probe}</script>"
    at = text.lower().rfind("</body>")
    text = text[:at] + script + text[at:] if at >= 0 else text + script
    copy = path.with_name(f".probe-{uuid.uuid4().hex[:8]}-{path.name}")
    copy.write_text(text, encoding="utf-8")
    return copy


@contextmanager
def _browser(target: Path, *, timeout: float) -> Iterator[tuple[_DevTools, str]]:
    """Headless Chromium with `target` loaded (load event fired): its DevTools connection and page session."""
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; `make test` installs it)")
    profile = tempfile.mkdtemp(prefix="attnlab-chromium-")
    chrome_reads, we_write = os.pipe()
    we_read, chrome_writes = os.pipe()
    chrome_reads, chrome_writes = (_above(fd, 10) for fd in (chrome_reads, chrome_writes))
    log = tempfile.TemporaryFile()

    def pipe_fds() -> None:  # in the child before exec: chromium reads commands on fd 3, writes on fd 4
        os.dup2(chrome_reads, 3)
        os.dup2(chrome_writes, 4)

    proc = subprocess.Popen(
        [exe, *FLAGS, f"--user-data-dir={profile}", "about:blank"], preexec_fn=pipe_fds, close_fds=False,
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    os.close(chrome_reads)
    os.close(chrome_writes)
    tools = _DevTools(proc, we_write, we_read)
    try:
        target_id = tools.call("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            tools.call(f"{domain}.enable", session=session)
        tools.events.clear()  # events of about:blank
        navigated = tools.call("Page.navigate", {"url": target.as_uri()}, session, timeout=timeout)
        if navigated.get("errorText"):
            raise RuntimeError(f"chromium could not open {target}: {navigated['errorText']}")
        tools.wait_for("Page.loadEventFired", session, timeout=timeout)
        yield tools, session
        try:
            tools.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass  # the browser may close its pipe before answering
    except (RuntimeError, TimeoutError) as err:
        log.seek(0)
        tail = log.read().decode(errors="replace")[-3000:]
        raise RuntimeError(f"{err}\nchromium's output ends with:\n{tail}") from err
    finally:
        os.close(we_write)
        os.close(we_read)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)


def _evaluate(tools: _DevTools, session: str, expression: str, *, timeout: float) -> Any:
    reply = tools.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                       session, timeout=timeout)
    return reply["result"].get("value")


def open_page(path: str | Path, *, probe: str | None = None, settle: float = 0.2, timeout: float = 60.0) -> Page:
    """Load the local page `path` in headless Chromium and return what it saw (see the module doc).

    `settle` seconds after the load event let timers and late errors land before the DOM is read.
    The test is skipped when Chromium is not installed.
    """
    path = Path(path).resolve()
    target = with_probe(path, probe) if probe is not None else path
    try:
        with _browser(target, timeout=timeout) as (tools, session):
            _evaluate(tools, session, f"new Promise(r => setTimeout(r, {int(settle * 1000)}))", timeout=timeout)
            page = Page(dom=_evaluate(tools, session, "document.documentElement.outerHTML", timeout=timeout))
            _collect(tools.events, page)
            return page
    finally:
        if target != path:
            target.unlink(missing_ok=True)


def screenshot(path: str | Path, out: str | Path, *, selector: str | None = None, width: int = 1400,
               height: int = 2000, open_details: bool = False, timeout: float = 60.0) -> dict[str, int]:
    """A PNG of the page `path` as a reader sees it at `width` px: the element `selector` (all of it) or the
    first `height` px; `open_details` unfolds every <details> first. Returns the page's full height and the
    shot's size in CSS px ({"page_height", "width", "height"})."""
    path = Path(path).resolve()
    with _browser(path, timeout=timeout) as (tools, session):
        tools.call("Emulation.setDeviceMetricsOverride",
                   {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)
        if open_details:
            _evaluate(tools, session, "document.querySelectorAll('details').forEach(d => d.open = true)", timeout=timeout)
        page_height = int(_evaluate(tools, session, "document.documentElement.scrollHeight", timeout=timeout))
        if selector is None:
            clip = {"x": 0, "y": 0, "width": width, "height": min(height, page_height)}
        else:
            box = _evaluate(tools, session, f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                            "if (!e) return null; const r = e.getBoundingClientRect(); "
                            "return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()", timeout=timeout)
            if box is None:
                raise ValueError(f"selector: expected an element of {path.name}, got none for {selector!r}")
            clip = {"x": box[0], "y": box[1], "width": box[2], "height": box[3]}
        shot = tools.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                     "clip": {**clip, "scale": 1}}, session, timeout=timeout)
        Path(out).write_bytes(base64.b64decode(shot["data"]))
        return {"page_height": page_height, "width": int(clip["width"]), "height": int(clip["height"])}
