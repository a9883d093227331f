"""Shared by the server tests: the real server on loopback around the tiny chat model (fixtures: serve/conftest.py)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from helpers.tiny_chat import make_chat_model as make_model
from medusa.model import MedusaModel
from medusa.serve.app import ServeSettings, create_app
from medusa.serve.engine import Engine, EngineConfig
from medusa.serve.server import ServerConfig, make_server

MODEL_NAME = "tiny"


def make_slow_model(seconds_per_forward: float) -> MedusaModel:
    """The tiny model, but each forward pass takes at least this long: long generations on demand."""
    model = make_model()
    model.base_model.register_forward_pre_hook(lambda module, args: time.sleep(seconds_per_forward))
    return model


class RunningServer:
    """The server ``medusa serve`` runs, on a free loopback port in a background thread."""

    def __init__(
        self,
        model: MedusaModel,
        settings: ServeSettings,
        engine_config: EngineConfig,
        server_config: ServerConfig | None = None,
    ) -> None:
        self.engine = Engine(model, engine_config)
        self.settings = settings
        self.app = create_app(self.engine, settings)
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = make_server(self.app, server_config or ServerConfig(log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.socket.close()


@contextlib.contextmanager
def running_server(model: MedusaModel, **options) -> Iterator[RunningServer]:
    engine_options = {k: options.pop(k) for k in ("max_waiting", "request_timeout", "max_batch") if k in options}
    server_options = {k: options.pop(k) for k in list(options) if k in ServerConfig.__dataclass_fields__}
    settings = ServeSettings(model_name=MODEL_NAME, **options)
    server_config = ServerConfig(log_level="warning", **server_options)
    with RunningServer(model, settings, EngineConfig(**engine_options), server_config) as server:
        yield server
