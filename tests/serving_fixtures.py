"""A real Triton server on the tiny checkpoint, started once per test session.

Import the fixtures into a test module with `from serving_fixtures import served_tiny, tiny_pipeline`.
The server binds 127.0.0.1 on ports the kernel says are free; tritonserver itself comes from the
nvidia-pytriton wheel, unpacked into tools/ on first use (runtime.serving.server.provision).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Served:
    server: object  # runtime.serving.server.TritonServer
    checkpoint: Path
    repository: Path
    log: list[str]

    @property
    def grpc_url(self) -> str:
        return self.server.grpc_url

    @property
    def http_url(self) -> str:
        return self.server.http_url

    def url(self, protocol: str) -> str:
        return self.grpc_url if protocol == "grpc" else self.http_url


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    """The in-process reference the served answers are compared with."""
    from runtime.pipeline import FacePipeline

    return FacePipeline.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def served_tiny(tiny_checkpoint, tmp_path_factory):
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import ServerError, TritonServer, free_ports

    repo = tmp_path_factory.mktemp("serving") / "repository"
    fill_repository(repo, checkpoint=tiny_checkpoint, max_batch_size=8)
    http_port, grpc_port, metrics_port = free_ports(3)
    log: list[str] = []
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          log=log.append, provision_log=lambda _m: None, exit_timeout_s=3)
    try:
        server.start(timeout_s=300)
    except ServerError as e:
        pytest.fail(f"tritonserver did not start: {e}\n--- last log lines ---\n" + "\n".join(log[-40:]))
    yield Served(server, Path(tiny_checkpoint), repo, log)
    server.stop()
