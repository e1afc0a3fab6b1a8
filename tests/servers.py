"""Real servers for tests, on 127.0.0.1 and free ports: a moto S3 server (server mode, its own
process) and the tritonserver binary that the nvidia-pytriton wheel bundles (started by
tailor.serve_local, which serve-check shares; here a missing binary skips the test).

Both run in their own process session, so stopping one also ends its children (Triton's
python-backend stubs); both are stopped by the fixtures even when a test fails.
"""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from tailor import serve_local
from tailor.serve_local import HOST, free_port, start_with_retries, stop_process, wait_http


# ---------------------------------------------------------------- S3 (moto, server mode)
class MotoServer:
    """`python -m moto.server` in its own process; state lives as long as the process."""

    def __init__(self, log: Path):
        start_with_retries(lambda: self._start(log))

    def _start(self, log: Path):
        self.port = free_port()
        self.endpoint_url = f"http://{HOST}:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_http(f"{self.endpoint_url}/moto-api/data.json", self.proc, log)
        except BaseException:
            stop_process(self.proc)
            raise

    @property
    def env(self) -> dict[str, str]:
        # Dummy credentials: moto accepts any; they exist only for this local server.
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "tailor-test-key",
            "AWS_SECRET_ACCESS_KEY": "tailor-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self):
        stop_process(self.proc)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_server, monkeypatch):
    """AWS_* variables pointing at the test's moto server, for this test only."""
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    for k, v in moto_server.env.items():
        monkeypatch.setenv(k, v)
    return moto_server


# ---------------------------------------------------------------- Triton
@contextlib.contextmanager
def running_triton(repository: str, workdir: Path, extra_env: dict[str, str] | None = None):
    """tailor.serve_local.running_triton, skipping the test when the bundled server is absent."""
    try:
        server = serve_local.TritonServer(repository, workdir, extra_env)
    except serve_local.TritonUnavailable as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- shared test material
def tiny_cnn(num_classes: int = 5, seed: int = 0):
    """conv + bn + hardswish + pool + linear: the op set of the real networks, 32x32 input."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.Hardswish(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
    model.eval()
    with torch.no_grad():
        # Non-trivial BN statistics, so that eval-mode export (running stats) is exercised.
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        # An untrained net predicts nearly one class for everything; centre and scale the logits
        # on a calibration batch so that test images spread over all classes (so label and
        # accuracy checks see several classes).
        x = torch.from_numpy(sample_images(256, seed=12345)).float().permute(0, 3, 1, 2) / 255
        logits = model((x - 0.5) / 0.25)
        head = model[-1]
        head.weight /= logits.std(0, keepdim=True).T
        head.bias.copy_(head.bias / logits.std(0) - logits.mean(0) / logits.std(0))
    return model


def sample_images(n: int, seed: int = 0, size: int = 32):
    """uint8 [n, size, size, 3]: a colour, a gradient and noise per image (varied, like photos)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (n, 1, 1, 3))
    ramp = np.linspace(-1, 1, size)[None, :, None, None]
    grad = rng.uniform(-120, 120, (n, 1, 1, 3)) * ramp
    noise = rng.normal(0, 30, (n, size, size, 3))
    return np.clip(base + grad + noise, 0, 255).astype(np.uint8)


def export_settings(**changes):
    from tailor.export import ExportConfig, S3Config

    values = dict(
        opset=17,
        parity_tolerance=1e-4,
        parity_images=16,
        max_batch_size=16,
        preferred_batch_sizes=[4, 8],
        max_queue_delay_us=500,
        instance_kind="cpu",
        instance_count=1,
        graph_optimization_level="all",
        intra_op_threads=1,
        tensorrt=False,
        tensorrt_precision="FP16",
        latency_batch_sizes=[1, 4],
        latency_warmup=1,
        latency_repeats=3,
        s3=S3Config(max_attempts=2, connect_timeout_s=2.0, read_timeout_s=10.0),
    )
    values.update(changes)
    return ExportConfig(**values)


def serve_settings(**changes):
    from tailor.export import ServeConfig

    values = dict(
        protocols=["http", "grpc"],
        ready_timeout_s=30.0,
        request_timeout_s=20.0,
        load_timeout_s=60.0,
        batch_size=16,
        max_images=64,
        accuracy_tolerance=1 / 64,
        concurrencies=[1, 2],
        requests_per_concurrency=20,
        latency_batch_size=4,
        latency_timeout_s=30.0,
    )
    values.update(changes)
    return ServeConfig(**values)
