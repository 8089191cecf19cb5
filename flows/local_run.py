"""What ``densepipe run`` needs from Prefect on a terminal: its console logging with task run names
and without tracebacks (they stay in the flow run's logs), and a temporary server that a signal to
the command's process group does not take down.

Nothing here imports Prefect at module level: ``prefect_console_logging`` must run before Prefect
is first imported (Prefect configures logging once, at import).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from prefect.context import refresh_global_settings_context
from prefect.logging.configuration import setup_logging
from prefect.logging.handlers import PrefectConsoleHandler

from pipeline.errors import PrefectServerError


def prefect_console_logging() -> None:
    """Let Prefect configure logging as it normally does, before it is imported (``run``, ``serve``).

    Prefect's ``setup_logging`` drops its root console handler (the one that prints flow and task run
    names) when the root logger already has another handler with a formatter, as ``pipeline.cli``'s
    is; its log lines then came out as ``ERROR prefect.task_runs: ...``, without the task run name.
    """
    root = logging.getLogger()
    ours = [h for h in root.handlers if h.get_name() == "densepipe"]
    for handler in ours:
        root.removeHandler(handler)
    if ours and "prefect" in sys.modules:  # Prefect was configured while ours was there
        if not any(isinstance(h, PrefectConsoleHandler) for h in root.handlers):
            setup_logging(incremental=False)


class WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving out its traceback and stack (Prefect's API log
    handler, which saw the record first, keeps them in the run's logs on the server)."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def console_without_tracebacks() -> None:
    """Prefect's console handler (after Prefect is imported) prints log lines without tracebacks."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter,
                                                                           WithoutTraceback):
            handler.setFormatter(WithoutTraceback(handler.formatter))


class TemporaryServer:
    """Prefect's temporary server for one ``densepipe run``, kept in its own session.

    What Prefect starts when PREFECT_API_URL is unset (``SubprocessASGIServer``: SQLite under
    PREFECT_HOME, no UI), but from a small keeper process in a new session, so that Ctrl-C or a
    SIGTERM sent to this command's process group interrupts the run, not the server: the run can
    still report how it ended. Server output is appended to ``log``, not the terminal. Started in
    ``__init__`` (in the background); ``use()`` waits for it and points this process's Prefect
    settings at it; ``stop()`` stops it, at exit (after Prefect's log and event workers have drained
    into it). The keeper also stops the server when this process ends any other way (its stdin
    closes), SIGKILL included.
    """

    KEEPER = "\n".join([
        "import signal, sys",
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))",
        "from prefect.server.api.server import SubprocessASGIServer",
        "server = SubprocessASGIServer()",
        "try:",
        "    server.start()",
        "    print(server.api_url, flush=True)",
        "    sys.stdin.read()",
        "except Exception as e:",
        "    print(f'error {type(e).__name__}: {e}', flush=True)",
        "finally:",
        "    server.stop()",
    ])

    def __init__(self, log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        with open(log, "ab") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-c", self.KEEPER], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                         start_new_session=True)
        self.url: str | None = None
        atexit.register(self.stop)  # after threading's exit hooks, where Prefect's workers drain

    def use(self) -> str:
        """Wait for the server; set PREFECT_API_URL for this process; the API URL. Raises
        ``PrefectServerError`` when the server did not start."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            reason = line.removeprefix("error ") or f"its keeper exited with code {self.proc.wait()}"
            raise PrefectServerError(f"Prefect's temporary server did not start: {reason} (log {self.log})")
        self.url = line
        os.environ["PREFECT_API_URL"] = line
        os.environ.setdefault("PREFECT_UI_URL", "")  # that server has no UI: no "View at" links
        refresh_global_settings_context()
        return line

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server and wait up to ``timeout_s`` for it, then kill what is left. A running
        server is stopped by closing the keeper's stdin; one still starting, by SIGTERM."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
            if self.url is None and self.proc.poll() is None:
                self.proc.terminate()
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
