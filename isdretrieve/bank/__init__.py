"""Banks: export an encoder's features over a data set (resumable, sharded across torchrun ranks), join
shard banks, and move embeddings in and out (arrays, npy, parquet, HDF5)."""
