"""Start the tritonserver binary that the nvidia-pytriton wheel bundles, on 127.0.0.1 and free ports.

serve-check uses it when no server URL is given (the default DAG on a machine without Triton),
and the tests use it (tests/servers.py) for the live-server checks. That build has only the
python backend: exported models are served through their python-backend twins
(tailor.export.python_backend_twin), see docs/serving.md.

The server runs in its own process session, so stopping it also ends its children (the
python-backend stubs), and every wait is bounded.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0


class TritonUnavailable(RuntimeError):
    """The bundled tritonserver (or its python-backend stub for this Python) is not installed."""


class StartFailed(RuntimeError):
    """A server process exited while starting (e.g. a port taken in the meantime)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return "<no log>"


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_http(url: str, proc: subprocess.Popen, log: Path, ok=(200,), timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll `url` until it answers with a status in `ok`; StartFailed if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StartFailed(f"server exited with {proc.returncode} while starting:\n{log_tail(log)}")
        if _http_status(url) in ok:
            return
        time.sleep(0.2)
    raise RuntimeError(f"server not ready at {url} after {timeout_s}s:\n{log_tail(log)}")


def start_with_retries(start, attempts: int = 3):
    # Free ports are picked before the server binds them; another process can take one in
    # between, so a server that dies while starting is tried again on fresh ports.
    for attempt in range(attempts):
        try:
            return start()
        except StartFailed:
            if attempt == attempts - 1:
                raise


def stop_process(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    # The process was started as the leader of its own session (pgid == its pid): this reaches
    # only what it spawned, e.g. python-backend stubs left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# ---------------------------------------------------------------- Triton
def tritonserver_dist() -> Path | None:
    """The wheel's tritonserver/ directory, or None when nvidia-pytriton is not installed."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.origin:
        return None
    dist = Path(spec.origin).parent / "tritonserver"
    return dist if (dist / "bin" / "tritonserver").exists() else None


def python_backend_dir(dist: Path, workdir: Path) -> Path:
    """A backends/ dir whose python backend has the stub built for this interpreter's version
    (the wheel ships one stub per Python version and leaves the choice to the user)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonUnavailable(f"nvidia-pytriton ships no python-backend stub for Python {version}")
    backends = workdir / "backends"
    py = backends / "python"
    if not py.exists():
        shutil.copytree(dist / "backends" / "python", py, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, py / "triton_python_backend_stub")
    return backends


def triton_env(dist: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The copied binaries lose their $ORIGIN-relative path to the wheel's bundled libraries, and
    # the stub links libpython3.x.so: point the loader at the wheel's libs and at the running
    # interpreter's libpython (not the system one).
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    # The stub's embedded interpreter finds site-packages (numpy, onnxruntime) via PATH's python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


class TritonServer:
    """tritonserver --model-control-mode=explicit on 127.0.0.1 with free http/grpc/metrics ports.

    `repository` is a local path or Triton's s3://host:port/bucket/prefix form (credentials and
    region then come from AWS_* variables, e.g. through `extra_env`).
    """

    def __init__(self, repository: str, workdir: Path, extra_env: dict[str, str] | None = None):
        dist = tritonserver_dist()
        if dist is None:
            raise TritonUnavailable(
                "the bundled tritonserver is not installed (pip package nvidia-pytriton, extra 'serve' of tailor); "
                "install it, or point serve-check at a running Triton with --url / --grpc-url")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        backends = python_backend_dir(dist, workdir)
        start_with_retries(lambda: self._start(dist, backends, repository, workdir, extra_env))

    def _start(self, dist, backends, repository, workdir, extra_env):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.log = workdir / f"tritonserver-{self.http_port}.log"
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={backends}",
            f"--cache-directory={dist / 'caches'}",
            f"--http-address={HOST}",
            f"--http-port={self.http_port}",
            f"--grpc-address={HOST}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={HOST}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=triton_env(dist, extra_env),
                start_new_session=True,
            )
        try:
            wait_http(f"http://{HOST}:{self.http_port}/v2/health/ready", self.proc, self.log)
        except BaseException:
            stop_process(self.proc)
            raise

    @property
    def urls(self) -> dict[str, str]:
        return {"http": f"{HOST}:{self.http_port}", "grpc": f"{HOST}:{self.grpc_port}"}

    def log_tail(self, chars: int = 4000) -> str:
        return log_tail(self.log, chars)

    def stop(self):
        stop_process(self.proc)


@contextlib.contextmanager
def running_triton(repository: str, workdir: Path, extra_env: dict[str, str] | None = None):
    server = TritonServer(repository, workdir, extra_env)
    try:
        yield server
    finally:
        server.stop()
