"""Reaching a Milvus: where (a URI, never written or printed with its secrets), with which token (read
from an environment variable that the user names), and Milvus's failures as one-line errors.

A URI is either a milvus-lite file (``bank.db``: the embedded engine, run inside this process) or a
server (``http://host:19530``, ``https://...``: a Milvus cluster, a standalone Milvus, or milvus-lite
started as ``milvus-lite server``). Credentials go in the token, never in the URI.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

from isdretrieve.errors import IsdError, MissingExtra

LOCAL_SUFFIX = ".db"
SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")
COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_aliases = itertools.count()


class MilvusUnavailable(IsdError):
    """A Milvus is down, unreachable, or refuses what it is asked (a bad token, an unsupported index)."""


def pymilvus_module() -> ModuleType:
    """pymilvus (its ORM is used for columnar inserts), with its logging and deprecation notes quieted,
    or a MissingExtra naming the extra to install."""
    try:
        import pymilvus
    except ImportError:
        raise MissingExtra(
            "Milvus needs pymilvus and milvus-lite: pip install 'isdretrieve[milvus]'"
        ) from None
    for name in ("pymilvus", "milvus_lite"):  # they log tracebacks of errors we report in one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=".*ORM-style PyMilvus API.*")
    return pymilvus


def is_local(uri: str) -> bool:
    """Whether ``uri`` names a milvus-lite file rather than a server."""
    return "://" not in uri and not uri.startswith("unix:")


def redact_uri(uri: str) -> str:
    """``uri`` without user, password, query or fragment: what may be printed and recorded."""
    if is_local(uri):
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def check_uri(uri: str) -> str:
    """``uri`` if it is a milvus-lite file (``*.db``) or a server URI, else an IsdError."""
    if is_local(uri):
        if not uri.endswith(LOCAL_SUFFIX):
            raise IsdError(
                f"a Milvus URI is a milvus-lite file ending in {LOCAL_SUFFIX} or http(s)://HOST:PORT"
            )
        return uri
    scheme = uri.split(":", 1)[0].lower()
    if scheme not in SERVER_SCHEMES:
        raise IsdError(
            f"Milvus URI {redact_uri(uri)!r}: the scheme must be one of {', '.join(SERVER_SCHEMES)}"
        )
    if urlsplit(uri).username or urlsplit(uri).password:
        raise IsdError("put Milvus credentials in the token (--milvus-token ENV), not in the URI")
    return uri


def check_collection_name(name: str) -> str:
    if not COLLECTION_NAME.fullmatch(name):
        raise IsdError(
            f"collection name {name!r}: use letters, digits and underscores, not starting with a digit"
        )
    return name


@dataclass(frozen=True)
class MilvusTarget:
    """A collection in a Milvus: the URI (a local ``.db`` is resolved against ``base``), the collection,
    the environment variable holding the token (None: no token), and the timeout of each call."""

    uri: str
    collection: str
    token_env: str | None = None
    timeout: float = 60.0

    def __post_init__(self) -> None:
        check_uri(self.uri)
        check_collection_name(self.collection)
        if self.token_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.token_env):
            raise IsdError(
                f"--milvus-token takes the name of an environment variable, got {self.token_env!r}"
            )

    @property
    def safe_uri(self) -> str:
        return redact_uri(self.uri)

    def token(self) -> str | None:
        """The token, read from the environment variable named by ``token_env``."""
        if self.token_env is None:
            return None
        token = os.environ.get(self.token_env)
        if not token:
            raise IsdError(f"the Milvus token variable {self.token_env} is not set (or empty)")
        return token

    def resolved_uri(self, base: Path) -> str:
        """The URI to connect to: a relative milvus-lite file is taken relative to ``base``."""
        if is_local(self.uri):
            return str((base / self.uri).resolve())
        return self.uri

    def recorded(self, directory: Path) -> dict[str, str | None]:
        """What the manifest of ``directory`` keeps: the URI without secrets (a milvus-lite file inside
        the directory relative to it, so the directory can move), the collection, the token's variable."""
        uri = self.safe_uri
        if is_local(self.uri):
            path, home = Path(self.uri).resolve(), directory.resolve()
            uri = str(path.relative_to(home)) if path.is_relative_to(home) else str(path)
        return {"uri": uri, "collection": self.collection, "token_env": self.token_env}


def one_line(exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """A Milvus error's message on one line, with ``secrets`` (token, full URI) blanked."""
    text = str(getattr(exc, "message", "") or exc).strip() or type(exc).__name__
    text = " ".join(text.split())
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


@contextlib.contextmanager
def milvus_errors(target: MilvusTarget, doing: str, secrets: tuple[str, ...] = ()) -> Iterator[None]:
    """Turn what pymilvus or gRPC raises while ``doing`` into one :class:`MilvusUnavailable` line."""
    try:
        yield
    except IsdError:
        raise
    except Exception as exc:  # pymilvus raises MilvusException, gRPC errors, ConnectionError, ValueError
        message = one_line(exc, secrets)
        raise MilvusUnavailable(f"Milvus at {target.safe_uri} ({doing}): {message}") from None


@dataclass
class Connection:
    """An open connection: its pymilvus alias, the target, and its token (blanked in messages)."""

    alias: str
    target: MilvusTarget
    secrets: tuple[str, ...]

    def errors(self, doing: str) -> contextlib.AbstractContextManager[None]:
        return milvus_errors(self.target, doing, self.secrets)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            pymilvus_module().connections.disconnect(self.alias)


def connect(target: MilvusTarget, base: Path) -> Connection:
    """Connect to ``target`` (a local ``.db`` relative to ``base``); a Milvus that is down, or refuses
    the token, is a MilvusUnavailable."""
    pymilvus = pymilvus_module()
    token = target.token()
    uri = target.resolved_uri(base)
    if is_local(target.uri):
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    alias = f"isdretrieve-{os.getpid()}-{next(_aliases)}"
    secrets = (token,) if token else ()
    with milvus_errors(target, "connecting", secrets):
        kwargs = {"token": token} if token else {}
        pymilvus.connections.connect(alias, uri=uri, timeout=target.timeout, **kwargs)
    return Connection(alias, target, secrets)
