"""``isd-index serve``: the HTTP search service and its web page over one or more index directories."""

from __future__ import annotations

from pathlib import Path

import click

from isdretrieve.cli.common import user_errors, verbose_option

CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.command(context_settings=CONTEXT)
@click.argument("index_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token",
    envvar="ISD_SERVE_TOKEN",
    help="Token every /api request must carry (env ISD_SERVE_TOKEN); required off loopback.",
)
@click.option("--device", default="auto", show_default=True, help="Encoder device: auto, cpu, cuda.")
@click.option("--max-upload", default="8MB", show_default=True, help="Largest uploaded image, in bytes.")
@click.option(
    "--max-pixels", default=40_000_000, show_default=True, type=click.IntRange(1), help="Per image."
)
@click.option(
    "--max-batch", default=64, show_default=True, type=click.IntRange(1, 4096), help="Images per forward."
)
@verbose_option
@user_errors
def serve(
    index_dirs: tuple[Path, ...],
    host: str,
    port: int,
    token: str | None,
    device: str,
    max_upload: str,
    max_pixels: int,
    max_batch: int,
) -> None:
    """Serve INDEX_DIR... over HTTP: a JSON API (docs at /docs) and a search page at /."""
    from isdretrieve.errors import IsdError
    from isdretrieve.pipeline import parse_size
    from isdretrieve.serve.security import check_bind

    check_bind(host, token)
    try:
        import uvicorn

        from isdretrieve.serve.app import ServeSettings, create_app, open_indices
    except ImportError as exc:
        raise IsdError(
            f"isd-index serve needs the serve extra ({exc.name} is missing): pip install 'isdretrieve[serve]'"
        ) from None
    settings = ServeSettings(
        token=token, max_upload_bytes=parse_size(max_upload), max_pixels=max_pixels, max_batch=max_batch
    )
    app = create_app(open_indices(index_dirs, device=device), settings)
    where = f"[{host}]" if ":" in host else host
    click.echo(f"serving {len(index_dirs)} index(es) on http://{where}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
