"""Milvus as the search backend: the index kinds our factory strings map to (``params``), reaching a
Milvus (``connect``), a bank's collection (``collection``), filling it resumably (``fill``), building and
attaching index directories (``build``) and searching one (``search``)."""
