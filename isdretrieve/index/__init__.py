"""FAISS indices over banks: the auto plan, building and tuning, exact search and held-out recall,
inverted lists on disk, and :class:`~isdretrieve.index.search.SearchIndex` for searching a built one."""
