"""Data: SPEC strings (``specs``), the one opener (``open``), datasets of fixed-size uint8 images
(``datasets``, ``sources``, ``shards`` for webdataset tars, ``subsets``), crops taken in loader workers
(``crops``), batched on-device view augmentation (``augment``) and untrusted uploads (``uploads``)."""
