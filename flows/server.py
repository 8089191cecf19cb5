"""A local ``prefect server start`` on loopback: what scheduling needs when no server is configured.

Prefect's temporary in-process server cannot schedule, so serving a deployment on a schedule needs a
long-running server. ``local_prefect_server`` starts one as a subprocess (its own process group, SQLite
under ``home``), waits for ``/api/health`` and stops the whole group on exit.

``python -m flows.server --port 4200 -- densepipe serve --cron "0 3 * * *"`` runs the command with
``PREFECT_API_URL`` pointing at a fresh local server and stops the server when the command ends
(Ctrl-C included). ``make serve`` uses it when ``PREFECT_API_URL`` is not set.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import anyio
import httpx
from prefect.settings import get_current_settings

from pipeline.errors import DensepipeError, PrefectServerError

DEFAULT_PORT = 4200
STOP_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def check_api(api_url: str, *, timeout_s: float) -> None:
    """GET ``<api_url>/health`` and expect Prefect's ``true``, all within ``timeout_s`` seconds.

    Raises ``PrefectServerError`` naming the URL (and the timeout when nothing answered in time).
    """
    url = api_url.rstrip("/") + "/health"

    async def get() -> httpx.Response:
        with anyio.fail_after(timeout_s):
            async with httpx.AsyncClient(timeout=timeout_s) as client:
                return await client.get(url)

    try:
        response = anyio.run(get)
    except TimeoutError:
        raise PrefectServerError(f"PREFECT_API_URL {api_url}: no answer from {url} within {timeout_s:g} s; "
                                 "is the Prefect server running? (`make serve` starts one)") from None
    except (httpx.HTTPError, OSError) as e:
        reason = str(e) or type(e).__name__
        raise PrefectServerError(f"PREFECT_API_URL {api_url}: cannot reach {url} ({reason}); "
                                 f"is the Prefect server running? (`make serve` starts one)") from None
    try:
        healthy = response.status_code == 200 and response.json() is True
    except ValueError:
        healthy = False
    if not healthy:
        raise PrefectServerError(
            f"PREFECT_API_URL {api_url}: {url} answered HTTP {response.status_code} but not as a Prefect "
            f"API (expected `true`); the URL usually ends in /api, e.g. http://127.0.0.1:4200/api")


def _server_env(home: Path, host: str, port: int, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_API_KEY")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)})
    env.update(extra or {})
    return env


def _last_line(path: Path) -> str:
    """The last non-empty line of a log (for one-line error messages); '' when there is none."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return text[-1].strip() if text else ""


def _stop_group(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group of ``proc``; SIGKILL what is left after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children (uvicorn, services) may still be shutting down
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextmanager
def local_prefect_server(*, port: int, home: Path, host: str = "127.0.0.1", timeout_s: float = 120.0,
                         ui: bool = True, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """Run ``prefect server start`` on ``host:port`` with ``PREFECT_HOME=home``; yield its API URL.

    Waits up to ``timeout_s`` for ``/api/health`` (about 16 s on a fresh database); ``env`` adds
    settings for the server (e.g. ``PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS``). Server output
    goes to ``home/server.log``. On exit the server's whole process group is stopped (SIGTERM, then
    SIGKILL after 15 s). Raises ``PrefectServerError`` when the port is taken, the server exits early
    or does not answer in time.
    """
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    api_url = f"http://{host}:{port}/api"
    if _port_in_use(host, port):
        raise PrefectServerError(f"{host}:{port} is already in use: if a Prefect server runs there, set "
                                 f"PREFECT_API_URL={api_url}; otherwise choose another port")
    log_path = home / "server.log"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
           "--analytics-off", "--ui" if ui else "--no-ui"]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=_server_env(home, host, port, env), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise PrefectServerError(f"prefect server for {api_url} exited with code {proc.returncode} "
                                         f"(log {log_path}; last line: {_last_line(log_path)})")
            try:
                check_api(api_url, timeout_s=2.0)
                break
            except PrefectServerError:
                if time.monotonic() > deadline:
                    raise PrefectServerError(
                        f"prefect server for {api_url} did not answer /health within {timeout_s:g} s "
                        f"(log {log_path}; last line: {_last_line(log_path)})") from None
                time.sleep(0.5)
        yield api_url
    finally:
        _stop_group(proc)


def _run_with_server(args: argparse.Namespace) -> int:
    """Start the local server, run the command against it, stop both; the command's exit code."""
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise PrefectServerError("no command given: python -m flows.server [options] -- COMMAND ...")
    home = Path(args.home) if args.home else _prefect_home()
    started = time.monotonic()
    with local_prefect_server(port=args.port, home=home, host=args.host, timeout_s=args.timeout,
                              ui=not args.no_ui) as api_url:
        print(f"prefect server on {api_url} (UI {api_url.removesuffix('/api')}, PREFECT_HOME {home}, "
              f"up in {time.monotonic() - started:.1f} s, log {home / 'server.log'})", flush=True)
        # the command gets its own process group; Ctrl-C and SIGTERM reach it once, through us
        child: subprocess.Popen | None = None
        try:
            child = subprocess.Popen(command, env={**os.environ, "PREFECT_API_URL": api_url},
                                     start_new_session=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, _forward_to(child))
            code = child.wait()
        finally:
            if child is not None and child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _forward_to(child: subprocess.Popen):
    def forward(signum: int, frame: object) -> None:
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass
    return forward


def _prefect_home() -> Path:
    return Path(get_current_settings().home)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.server",
        description="Run COMMAND with PREFECT_API_URL pointing at a local `prefect server start`; "
                    "the server stops when COMMAND ends.")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="Server port (default 4200).")
    parser.add_argument("--host", default="127.0.0.1", help="Server address (default 127.0.0.1).")
    parser.add_argument("--home", help="PREFECT_HOME of the server (default: Prefect's home, ~/.prefect).")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="Seconds to wait for the server's health check (default 120).")
    parser.add_argument("--no-ui", action="store_true", help="Serve the API only.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # while the server starts: stop it like Ctrl-C
    try:
        return _run_with_server(args)
    except DensepipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
