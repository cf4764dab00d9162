"""The HTTP search service and its web page, over :class:`~isdretrieve.retrieve.retriever.Retriever`.

``serve.app`` (needs the ``serve`` extra: FastAPI, uvicorn, python-multipart) builds the app from one
router a topic (``api_indices``, ``api_search``, ``api_rows``, ``api_pairs``); ``serve.batcher`` merges
concurrent image queries into one encoder forward; ``serve.security`` holds the bind/token rule and the
request guard (no third-party imports, so the CLI checks it first).
"""
