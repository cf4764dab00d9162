"""Retrieval: :class:`~isdretrieve.retrieve.retriever.Retriever` over an index directory, the queries it
takes, the one hit record, the pictures of bank rows, and the neighbours report."""
