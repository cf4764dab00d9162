"""``isd-index serve``: the HTTP search service and its web page over one or more index directories."""

from __future__ import annotations

from pathlib import Path

import click

from isdretrieve.cli.common import CONTEXT, DEVICE, SIZE, emit, json_option, user_errors, verbose_option


@click.command(context_settings=CONTEXT)
@click.argument("index_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    envvar="ISD_SERVE_TOKEN",
    help="Token every /api request must carry (env ISD_SERVE_TOKEN); required off loopback.",
)
@click.option("--device", type=DEVICE, default="auto", show_default=True, help="Encoder device.")
@click.option(
    "--max-upload", type=SIZE, default="8MB", show_default=True, help="Largest uploaded image, in bytes."
)
@click.option(
    "--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(1), help="Per image."
)
@click.option(
    "--max-batch", default=64, show_default=True, type=click.IntRange(1, 4096), help="Images per forward."
)
@json_option
@verbose_option
@user_errors
def serve(
    index_dirs: tuple[Path, ...],
    host: str,
    port: int,
    token: str | None,
    device: str,
    max_upload: int,
    max_pixels: int,
    max_batch: int,
    as_json: bool,
) -> None:
    """Serve INDEX_DIR... over HTTP: a JSON API (docs at /docs) and a search page at /.

    With --json, the address and the indices served are printed as one JSON document once listening starts.
    """
    from isdretrieve.errors import IsdError
    from isdretrieve.serve.security import check_bind

    check_bind(host, token)
    try:
        import uvicorn

        from isdretrieve.serve.app import create_app, open_indices
        from isdretrieve.serve.state import DamagedIndex, ServeSettings
    except ImportError as exc:
        raise IsdError(
            f"isd-index serve needs the serve extra ({exc.name} is missing): pip install 'isdretrieve[serve]'"
        ) from None
    settings = ServeSettings(
        token=token, max_upload_bytes=max_upload, max_pixels=max_pixels, max_batch=max_batch
    )
    retrievers = open_indices(index_dirs, device=device)
    app = create_app(retrievers, settings)
    where = f"[{host}]" if ":" in host else host
    url = f"http://{where}:{port}/"
    damaged = {name: r.error for name, r in retrievers.items() if isinstance(r, DamagedIndex)}
    for name, error in damaged.items():
        click.echo(f"warning: index {name!r} is damaged and answers 503: {error}", err=True)
    click.echo(f"serving {len(index_dirs)} index(es) on {url} (Ctrl-C stops)", err=True)
    paths = {name: getattr(r, "index_dir", getattr(r, "path", None)) for name, r in retrievers.items()}
    emit({"url": url, "indices": paths, "damaged": damaged}, as_json)
    uvicorn.run(app, host=host, port=port, log_level="warning")
