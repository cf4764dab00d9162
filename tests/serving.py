"""Test helpers for the search service: served copies of small indices and a real uvicorn server on a
free loopback port, in a thread."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

PAYLOAD = "<img src=x onerror=\"window.__pwned=1;document.body.setAttribute('data-pwned','1')\">"
CLASS_PAYLOAD = '<svg onload="window.__pwned=2">'


def index_with_pairs(source: Path, target: Path) -> Path:
    """A copy of the index ``source`` with ``pairs.h5`` (k=3, mutual) and its audit mined into it."""
    from isdretrieve.files.bank import FeatureBank
    from isdretrieve.files.pairs import MiningParams
    from isdretrieve.mine.audit import audit_pairs, audit_paths, write_audit
    from isdretrieve.mine.mining import mine_pairs

    shutil.copytree(source, target)
    pairs = mine_pairs(target / "bank.h5", target / "pairs.h5", MiningParams(k=3, mutual=True))
    with FeatureBank.open(target / "bank.h5") as bank:
        write_audit(audit_pairs(pairs, bank.labels(), bank.classes), *audit_paths(target / "pairs.h5"))
    return target


def hostile_folder(root: Path) -> Path:
    """An image folder whose class and file names carry HTML/script payloads (plus a plain class)."""
    rng = np.random.default_rng(0)
    names = {"plain": [f"{k}.png" for k in range(10)], CLASS_PAYLOAD: [f"{PAYLOAD}.png", "a.png", "b.png"]}
    for cls, files in names.items():
        (root / cls).mkdir(parents=True)
        for name in files:
            colour = rng.integers(0, 256, size=(1, 1, 3), dtype=np.uint8)
            pixels = np.clip(colour + rng.integers(0, 60, size=(16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / name)
    return root


class Server:
    """``app`` served by uvicorn on 127.0.0.1 (a free port) in a daemon thread; ``url`` to reach it."""

    def __init__(self, app: object) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]})

    def __enter__(self) -> Server:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        with contextlib.suppress(OSError):
            self._socket.close()


@contextlib.contextmanager
def serving(index_dirs: list[Path], device: str = "cpu", **settings: object) -> Iterator[Server]:
    """A running server over ``index_dirs`` (encoders on ``device``) with ``ServeSettings(**settings)``."""
    from isdretrieve.serve.app import create_app, open_indices
    from isdretrieve.serve.state import ServeSettings

    app = create_app(open_indices(index_dirs, device=device), ServeSettings(**settings))
    with Server(app) as server:
        server.served = app.app.state.served  # name -> ServedIndex, for tests that look inside
        yield server
