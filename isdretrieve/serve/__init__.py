"""The HTTP search service and its web page, over :class:`~isdretrieve.retrieval.Retriever`.

``serve.app`` (needs the ``serve`` extra: FastAPI, uvicorn, python-multipart) builds the app,
``serve.batcher`` merges concurrent image queries into one encoder forward, ``serve.security`` holds the
bind/token rule and the request guard (no third-party imports, so the CLI checks it first).
"""
