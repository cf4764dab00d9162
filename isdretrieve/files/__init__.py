"""The on-disk contracts: atomic writes, the encoder header, ``bank.h5`` (reader and the one writer),
an index directory's ``manifest.json`` and ``pairs.h5``. Read and written with h5py, NumPy and JSON
only, so any stage can open what another wrote without torch or FAISS."""
