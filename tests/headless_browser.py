"""A headless Chromium driven over the Chrome DevTools Protocol through --remote-debugging-pipe
(JSON messages separated by NUL bytes on file descriptors 3 and 4), so the tests need no
browser driver package: only the system's `chromium`."""
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--remote-debugging-pipe"]


class BrowserError(RuntimeError):
    pass


def find_browser():
    return next((path for path in map(shutil.which, BROWSER_NAMES) if path), None)


def _fd_above_4(fd):
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 5)
    os.close(fd)
    return moved


class Browser:
    """One page of a fresh browser profile. `events` keeps every CDP event received."""

    def __init__(self, executable, width=1600, height=900):
        self._profile = tempfile.mkdtemp(prefix="multiref-browser-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        # Move the child's ends above 4 so that placing them on 3 and 4 cannot overwrite them.
        to_browser_r, from_browser_w = (_fd_above_4(fd) for fd in (to_browser_r, from_browser_w))

        def wire_pipe_fds():  # the browser reads commands on fd 3 and answers on fd 4
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        # close_fds=False keeps fds 3 and 4; every other descriptor of this process is
        # non-inheritable (Python's default), so nothing else leaks into the browser.
        self._log_path = os.path.join(self._profile, "browser.log")
        with open(self._log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [executable, *FLAGS, f"--user-data-dir={self._profile}",
                 f"--window-size={width},{height}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                close_fds=False, preexec_fn=wire_pipe_fds)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events = []
        try:
            target = self.call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self.call("Target.attachToTarget", targetId=target,
                                      flatten=True)["sessionId"]
            for domain in ("Page", "Runtime"):
                self.call(f"{domain}.enable", session=True)
        except BrowserError:
            self.close()
            raise

    def call(self, method, session=False, timeout=30, **params):
        """Send one command (to the page when `session`) and return its result."""
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        try:
            os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise self._exited(method) from None
        deadline = time.time() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply["result"]
            if "method" in reply:
                self.events.append(reply)

    def _read(self, deadline, waiting_for):
        while b"\0" not in self._buffer:
            left = deadline - time.time()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError(f"no answer from the browser to {waiting_for}")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise self._exited(waiting_for)
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _exited(self, waiting_for):
        with open(self._log_path, errors="replace") as log:
            return BrowserError(f"the browser exited while waiting for {waiting_for}; its log: "
                                + log.read()[-3000:])

    def evaluate(self, expression, timeout=30):
        """Evaluate JavaScript in the page (awaiting a promise) and return its JSON value."""
        result = self.call("Runtime.evaluate", session=True, timeout=timeout,
                           expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(details.get("exception", {}).get("description")
                               or details.get("text"))
        return result["result"].get("value")

    def wait_for(self, expression, timeout=60, poll=0.25):
        """Poll until `expression` is truthy; errors count as not yet (a page that is still
        loading has no context to evaluate in) and the last one is reported on timeout."""
        deadline = time.time() + timeout
        last_error = None
        while True:
            try:
                if self.evaluate(expression):
                    return
            except BrowserError as exc:
                last_error = exc
            if time.time() > deadline:
                raise BrowserError(f"timed out waiting for {expression}; last error: "
                                   f"{last_error}; page errors: {self.page_errors()}")
            time.sleep(poll)

    def open(self, url):
        self.call("Page.navigate", session=True, url=url)

    def screenshot_png(self):
        return base64.b64decode(self.call("Page.captureScreenshot", session=True,
                                          format="png")["data"])

    def page_errors(self):
        """Uncaught exceptions and console.error messages seen so far."""
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details["text"])
            elif event["method"] == "Runtime.consoleAPICalled" and params["type"] == "error":
                errors.append(" ".join(str(a.get("value", a.get("description")))
                                       for a in params["args"]))
        return errors

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except BrowserError:
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        shutil.rmtree(self._profile, ignore_errors=True)
