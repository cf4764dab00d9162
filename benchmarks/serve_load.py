"""Load on ``isd-index serve``: concurrent image searches against a real server on loopback.

The server (``isd-index serve`` in its own process, 127.0.0.1 only) holds an exact index over the
CIFAR-10 test split (JPEG q75 copy; the embedded digits when the copy is absent) embedded by a
random-init small CNN at 32 px. Queries are test-split JPEG files uploaded as they are (k = 10), so each
one must find itself first: a wrong top hit counts as an error, like any non-200 answer or exception.

1. First request: the first image search after the server reports ready (its encoder and index were
   warmed up before the port opened) against the single-request p50 below. Goal <= 2x.
2. Single request: ``--single`` sequential searches of one image sent as the raw request body
   (``/search/image``); their p50 against the p50 of the bare in-process path for the same bytes (decode,
   encode, search with ``Retriever``; no HTTP). Goal <= 1.3. The same with a multipart upload
   (``/search/images``) and a request that does no work (a bank row's JSON) are measured alongside.
3. Load: ``--clients`` threads, each with its own keep-alive connection, search with random query images
   for ``--seconds`` (stopping early at ``--max-requests``); zero errors required; p50/p99 latency,
   requests/s, and the encoder batcher's forwards (how many requests shared one).

Both processes run torch with ``--threads`` intra-op threads.

    python benchmarks/serve_load.py [--clients 16] [--seconds 60] [--max-requests 200000] [--threads 1]
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the harness, and this checkout's isdretrieve
from _harness import cifar_root, write_result  # noqa: E402

from isdretrieve.data.open import open_dataset
from isdretrieve.files.encoder_header import IMAGENET_MEAN, IMAGENET_STD, EncoderHeader
from isdretrieve.models.backbones import build_backbone
from isdretrieve.models.checkpoints import export_encoder
from isdretrieve.pipeline import build_index_from_checkpoint
from isdretrieve.retrieve.retriever import Retriever

REPO = HERE.parent
GOAL = 1.3
K = 10


def build(root: Path) -> tuple[Path, str, list[tuple[int, bytes]]]:
    """The index directory, its data SPEC, and (dataset index, file bytes) of 64 query images."""
    found = cifar_root()
    spec = f"folder:{found / 'test'}" if found else "digits,split=test"
    torch.manual_seed(0)
    header = EncoderHeader("small_cnn", False, 256, 32 if found else 16, IMAGENET_MEAN, IMAGENET_STD)
    export_encoder(build_backbone("small_cnn"), header, root / "enc.pt")
    build_index_from_checkpoint(root / "enc.pt", spec, root / "index", factory="Flat", workers=2)
    data = open_dataset(spec)
    picks = random.Random(0).sample(range(len(data)), 64)
    if found:
        queries = [(i, (found / "test" / data.path(i)).read_bytes()) for i in picks]
    else:  # digits live in memory: upload them as PNG
        from isdretrieve.retrieve.pictures import tensor_to_pil

        queries = []
        for i in picks:
            buffer = io.BytesIO()
            tensor_to_pil(data[i][0]).save(buffer, format="PNG")
            queries.append((i, buffer.getvalue()))
    return root / "index", spec, queries


STACK_PROBE = (
    "import importlib.util, json; "
    "names = ('uvloop', 'httptools', 'orjson'); "
    "print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, port: int, threads: int, python: str = sys.executable) -> subprocess.Popen:
    """The server in its own process; returns once it answers (it listens only after its warm-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    command = [python, "-m", "isdretrieve.cli.index", "serve", str(index), "--port", str(port)]
    server = subprocess.Popen(command + ["--device", "cpu"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/indices", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start")


def search(client: httpx.Client, query: tuple[int, bytes], raw: bool = True) -> tuple[float, str]:
    """(seconds, problem) of one search (the raw-bytes route, or multipart); problem is "" when the answer
    is right."""
    index, data = query
    start = time.perf_counter()
    try:
        if raw:
            response = client.post(
                "/api/indices/index/search/image",
                params={"k": K},
                content=data,
                headers={"content-type": "application/octet-stream"},
            )
        else:
            response = client.post(
                "/api/indices/index/search/images", params={"k": K}, files={"files": ("q", data)}
            )
    except httpx.HTTPError as exc:
        return time.perf_counter() - start, f"{type(exc).__name__}: {exc}"
    took = time.perf_counter() - start
    if response.status_code != 200:
        return took, f"HTTP {response.status_code}: {response.text[:200]}"
    top = response.json()["results"][0]["hits"][0]
    return took, "" if top["index"] == index else f"top hit {top['index']} for query {index}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def compare_stacks(url: str, other: str, index: Path, query: tuple[int, bytes], repeat: int) -> dict:
    """Lean-client p50 of this server and of ``other`` (the same code under another interpreter, e.g.
    without uvloop, httptools and orjson), alternating, each against the bare path measured between."""
    from PIL import Image

    retriever = Retriever.open(index, device="cpu")
    mine = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    theirs = http.client.HTTPConnection(other.removeprefix("http://"), timeout=30)
    times: dict[str, list[float]] = {"this": [], "other": [], "bare": []}
    for n in range(repeat + 10):
        took = {"this": lean_search(mine, query), "other": lean_search(theirs, query)}
        start = time.perf_counter()
        retriever.search(Image.open(io.BytesIO(query[1])), k=K)
        took["bare"] = time.perf_counter() - start
        if n >= 10:
            for key, value in took.items():
                times[key].append(value)
    p50 = {key: statistics.median(values) for key, values in times.items()}
    return {
        "this_p50_ms": 1e3 * p50["this"],
        "other_p50_ms": 1e3 * p50["other"],
        "bare_p50_ms": 1e3 * p50["bare"],
        "this_ratio": p50["this"] / p50["bare"],
        "other_ratio": p50["other"] / p50["bare"],
    }


def single(url: str, index: Path, query: tuple[int, bytes], repeat: int) -> dict:
    """p50 of one search request against the bare in-process decode + encode + search of the same bytes,
    alternating request by request so that both see the same background load; also the p50 of a request
    that does no work (one bank row's JSON), the HTTP round trip's floor on this machine."""
    from PIL import Image

    retriever = Retriever.open(index, device="cpu")
    bare, served, multipart, floor, lean = [], [], [], [], []
    connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    with httpx.Client(base_url=url, timeout=30) as client:
        for n in range(repeat + 10):
            start = time.perf_counter()
            hits = retriever.search(Image.open(io.BytesIO(query[1])), k=K)
            took = time.perf_counter() - start
            assert hits[0][0].index == query[0]
            served_took, problem = search(client, query)
            assert not problem, problem
            multipart_took, problem = search(client, query, raw=False)
            assert not problem, problem
            start = time.perf_counter()
            assert client.get("/api/indices/index/rows/0").status_code == 200
            floor_took = time.perf_counter() - start
            lean_took = lean_search(connection, query)
            if n >= 10:  # after warm-up
                lean.append(lean_took)
                bare.append(took)
                served.append(served_took)
                multipart.append(multipart_took)
                floor.append(floor_took)
    ratio = statistics.median(served) / statistics.median(bare)
    return {
        "requests": repeat,
        "served_p50_ms": 1e3 * statistics.median(served),
        "bare_p50_ms": 1e3 * statistics.median(bare),
        "served_p99_ms": 1e3 * percentile(served, 99),
        "bare_p99_ms": 1e3 * percentile(bare, 99),
        "multipart_p50_ms": 1e3 * statistics.median(multipart),
        "multipart_ratio": statistics.median(multipart) / statistics.median(bare),
        "row_json_p50_ms": 1e3 * statistics.median(floor),
        "lean_client_p50_ms": 1e3 * statistics.median(lean),
        "lean_client_ratio": statistics.median(lean) / statistics.median(bare),
        "ratio": ratio,
        "goal": GOAL,
        "meets_goal": ratio <= GOAL,
    }


def lean_search(connection: http.client.HTTPConnection, query: tuple[int, bytes]) -> float:
    """Seconds of one raw-bytes search over a kept-alive ``http.client`` connection (a client with
    almost no overhead of its own: what is left is the server's)."""
    index, data = query
    start = time.perf_counter()
    connection.request("POST", f"/api/indices/index/search/image?k={K}", body=data)
    response = connection.getresponse()
    body = response.read()
    took = time.perf_counter() - start
    assert response.status == 200, body[:200]
    assert json.loads(body)["results"][0]["hits"][0]["index"] == index
    return took


def first_requests(url: str, query: tuple[int, bytes], n: int = 21) -> list[float]:
    """Seconds of the first ``n`` image searches the server answers, one after the other, each on a new
    ``http.client`` connection: the first against the median of the others, under the same conditions."""
    took = []
    for _ in range(n):
        connection = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
        try:
            took.append(lean_search(connection, query))
        finally:
            connection.close()
    return took


def _asgi_post(app, path: str, body: bytes):
    """One POST through the ASGI app in this process (no socket, no HTTP parsing), as a coroutine."""

    async def call() -> int:
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": f"k={K}".encode(),
            "root_path": "", "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }  # fmt: skip
        sent, status = [{"type": "http.request", "body": body, "more_body": False}], []

        async def receive():
            return sent.pop() if sent else {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    return call()


def profile_app(index: Path, query: tuple[int, bytes], repeat: int) -> dict:
    """Where a served search's time goes without the socket: the ASGI app in this process (routing,
    dependencies, decoding, batcher, search, JSON) against the bare path, alternating; then cProfile's
    top functions by own time over ``repeat`` app requests."""
    import asyncio
    import cProfile
    import pstats

    from PIL import Image

    from isdretrieve.serve.app import create_app, open_indices

    app = create_app(open_indices([index], device="cpu"))
    retriever = Retriever.open(index, device="cpu")
    path = "/api/indices/index/search/image"

    async def measure() -> dict:
        async with app.app.router.lifespan_context(app.app):
            in_app, bare = [], []
            for n in range(repeat + 10):
                start = time.perf_counter()
                assert await _asgi_post(app, path, query[1]) == 200
                took = time.perf_counter() - start
                start = time.perf_counter()
                retriever.search(Image.open(io.BytesIO(query[1])), k=K)
                if n >= 10:
                    in_app.append(took)
                    bare.append(time.perf_counter() - start)
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(repeat):
                await _asgi_post(app, path, query[1])
            profiler.disable()
        stats = pstats.Stats(profiler).sort_stats("tottime")
        total = sum(row[2] for row in stats.stats.values())
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]
        return {
            "app_p50_ms": 1e3 * statistics.median(in_app),
            "bare_p50_ms": 1e3 * statistics.median(bare),
            "app_over_bare": statistics.median(in_app) / statistics.median(bare),
            "top_own_time": [
                {"function": f"{Path(f).name}:{line}({name})", "share": round(row[2] / total, 4)}
                for (f, line, name), row in top
            ],
        }

    return asyncio.run(measure())


def load(url: str, queries: list[tuple[int, bytes]], clients: int, seconds: float, max_requests: int) -> dict:
    latencies: list[float] = []
    problems: list[str] = []
    lock, stop_at = threading.Lock(), time.monotonic() + seconds

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if len(latencies) >= max_requests:
                        return
                took, problem = search(client, rng.choice(queries))
                with lock:
                    latencies.append(took)
                    if problem:
                        problems.append(problem)

    start = time.monotonic()
    workers = [threading.Thread(target=client_loop, args=(n,)) for n in range(clients)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    wall = time.monotonic() - start
    return {
        "clients": clients,
        "seconds": wall,
        "requests": len(latencies),
        "errors": len(problems),
        "first_errors": problems[:5],
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1e3 * percentile(latencies, 50),
        "p99_ms": 1e3 * percentile(latencies, 99),
        "max_ms": 1e3 * max(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--single", type=int, default=200, help="sequential requests for the single p50")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads, both processes")
    parser.add_argument("--compare-python", help="also serve with this interpreter and compare (lean client)")
    parser.add_argument("--name", default="serve_load", help="writes benchmarks/results/NAME.json")
    args = parser.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..256 and --seconds 0..600 (the benchmark is bounded)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        index, spec, queries = build(Path(tmp))
        port = free_port()
        server = start_server(index, port, args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            first = first_requests(url, queries[1])
            one = single(url, index, queries[0], args.single)
            if args.compare_python:
                other_port = free_port()
                other = start_server(index, other_port, args.threads, args.compare_python)
                try:
                    found = compare_stacks(
                        url, f"http://127.0.0.1:{other_port}", index, queries[0], args.single
                    )
                finally:
                    other.terminate()
                    other.wait(timeout=30)
                stack = subprocess.run(
                    [args.compare_python, "-c", STACK_PROBE], capture_output=True, text=True, check=True
                )
                one["stack_comparison"] = {**found, "other_stack": json.loads(stack.stdout)}
                print(f"stacks: this {found['this_ratio']:.2f}, other {found['other_ratio']:.2f}", flush=True)
            one["first_request_ms"] = 1e3 * first[0]
            one["next_20_fresh_connections_p50_ms"] = 1e3 * statistics.median(first[1:])
            one["first_over_p50"] = first[0] / statistics.median(first[1:])
            print(f"first request {one['first_request_ms']:.2f} ms, {one['first_over_p50']:.2f}x the next 20")  # noqa: E501
            print(f"single: HTTP floor (a bank row's JSON) p50 {one['row_json_p50_ms']:.2f} ms", flush=True)
            print(
                f"single: served p50 {one['served_p50_ms']:.2f} ms, bare {one['bare_p50_ms']:.2f} ms, "
                f"ratio {one['ratio']:.2f} (multipart {one['multipart_p50_ms']:.2f} ms, "
                f"{one['multipart_ratio']:.2f}; http.client {one['lean_client_p50_ms']:.2f} ms, "
                f"{one['lean_client_ratio']:.2f})",
                flush=True,
            )
            loaded = load(url, queries, args.clients, args.seconds, args.max_requests)
            profile = profile_app(index, queries[0], args.single // 2)
            print(
                f"in process: app p50 {profile['app_p50_ms']:.2f} ms, bare {profile['bare_p50_ms']:.2f} ms, "
                f"{profile['app_over_bare']:.2f}x",
                flush=True,
            )
            batcher = httpx.get(f"{url}/api/indices/index", timeout=10).json()["batcher"]
        finally:
            server.terminate()
            server.wait(timeout=30)
    batcher["requests_per_forward"] = batcher["jobs"] / max(1, batcher["forwards"])
    print(
        f"load: {loaded['requests']} requests from {loaded['clients']} clients in {loaded['seconds']:.1f} s, "
        f"{loaded['errors']} errors, p50 {loaded['p50_ms']:.1f} ms, p99 {loaded['p99_ms']:.1f} ms, "
        f"{loaded['requests_per_s']:.0f} req/s, {batcher['requests_per_forward']:.2f} requests a forward"
    )
    stack = {name: importlib.util.find_spec(name) is not None for name in ("uvloop", "httptools", "orjson")}
    path = write_result(
        args.name,
        {
            "server_stack": stack,
            "protocol": {
                "data": "CIFAR-10 test split (JPEG q75 copy), 10,000 files as folder:ROOT/test"
                if spec.startswith("folder:")
                else spec,
                "encoder": "random-init small CNN (seed 0), 32 px, ImageNet statistics",
                "index": "Flat (exact)",
                "k": K,
                "query": "one image file per request as the raw body (/search/image; multipart in "
                "single.multipart_*), decoded on the server",
                "server": "isd-index serve, its own process, 127.0.0.1, device cpu",
                "clients": "threads in the benchmark process, httpx keep-alive connections, same machine",
                "torch_threads": args.threads,
            },
            "single": one,
            "profile_without_http": profile,
            "load": loaded,
            "batcher": batcher,
            "zero_errors": loaded["errors"] == 0,
            "note": "shared 2-core VM: other jobs ran during the measurement (see load_average_1_5_15); "
            "the clients and the server share its cores",
        },
    )
    print(f"wrote {path}")
    if loaded["errors"]:
        raise SystemExit(f"{loaded['errors']} errors under load")


if __name__ == "__main__":
    main()
