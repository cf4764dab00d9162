"""Indices over banks: the auto plan, building and tuning, exact search and held-out recall, inverted
lists on disk, the one index interface (``backend.VectorIndex``) with its FAISS implementation
(:class:`~isdretrieve.index.search.SearchIndex`) and its Milvus one (``milvus/``), and ``open.open_index``."""
