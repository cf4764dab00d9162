"""isdretrieve: train ISD-family self-supervised encoders and search their feature banks.

The names a user needs are importable from here, resolved on first use, so ``import isdretrieve`` loads
neither torch nor FAISS::

    from isdretrieve import Retriever, FrozenEncoder, build_index, export_bank, knn_evaluate, mine_pairs

The packages behind them go by pipeline stage (``docs/architecture.md``).
"""

from __future__ import annotations

import importlib
from typing import Any

from isdretrieve.version import __version__

_FACE: dict[str, str] = {
    # errors a user can cause
    "IsdError": "isdretrieve.errors",
    "DataError": "isdretrieve.errors",
    "CheckpointError": "isdretrieve.errors",
    "RecipeError": "isdretrieve.errors",
    "BankError": "isdretrieve.errors",
    "EmbeddingsError": "isdretrieve.errors",
    "QueryError": "isdretrieve.errors",
    "InvalidArgument": "isdretrieve.errors",
    "MissingExtra": "isdretrieve.errors",
    # files
    "FeatureBank": "isdretrieve.files.bank",
    "BankAttrs": "isdretrieve.files.bank",
    "BankWriter": "isdretrieve.files.bank_writer",
    "EncoderHeader": "isdretrieve.files.encoder_header",
    "IndexManifest": "isdretrieve.files.manifest",
    "read_manifest": "isdretrieve.files.manifest",
    "describe_index": "isdretrieve.files.manifest",
    "MiningParams": "isdretrieve.files.pairs",
    "Pairs": "isdretrieve.files.pairs",
    # data and models
    "parse_spec": "isdretrieve.data.specs",
    "open_dataset": "isdretrieve.data.open",
    "build_backbone": "isdretrieve.models.backbones",
    "load_backbone": "isdretrieve.models.checkpoints",
    "export_encoder": "isdretrieve.models.checkpoints",
    "export_safetensors": "isdretrieve.models.checkpoints",
    "convert_checkpoint": "isdretrieve.models.checkpoints",
    # encoder, banks, indices
    "FrozenEncoder": "isdretrieve.encoder",
    "export_bank": "isdretrieve.bank.export",
    "join_shards": "isdretrieve.bank.join",
    "write_bank": "isdretrieve.bank.arrays",
    "import_embeddings": "isdretrieve.bank.embeddings_in",
    "export_embeddings": "isdretrieve.bank.embeddings_out",
    "build_index": "isdretrieve.index.build",
    "choose_index": "isdretrieve.index.plan",
    "estimate_bytes": "isdretrieve.index.plan",
    "plan_index": "isdretrieve.index.planner",
    "exact_search": "isdretrieve.index.exact",
    "SearchIndex": "isdretrieve.index.search",
    "VectorIndex": "isdretrieve.index.backend",
    "LabelFilter": "isdretrieve.index.backend",
    "open_index": "isdretrieve.index.open",
    "MilvusTarget": "isdretrieve.index.milvus.connect",
    "MilvusIndex": "isdretrieve.index.milvus.search",
    "build_milvus_index": "isdretrieve.index.milvus.build",
    # using them
    "knn_evaluate": "isdretrieve.evaluate.knn_eval",
    "KnnReport": "isdretrieve.evaluate.knn_eval",
    "linear_probe": "isdretrieve.evaluate.linear_probe",
    "ProbeConfig": "isdretrieve.evaluate.linear_probe",
    "linear_eval_images": "isdretrieve.evaluate.linear_eval",
    "ImageProbeConfig": "isdretrieve.evaluate.linear_eval",
    "mine_pairs": "isdretrieve.mine.mining",
    "audit_pairs": "isdretrieve.mine.audit",
    "find_duplicates": "isdretrieve.mine.dedup",
    "DedupResult": "isdretrieve.mine.dedup",
    "Retriever": "isdretrieve.retrieve.retriever",
    "Hit": "isdretrieve.retrieve.hits",
    "BankRow": "isdretrieve.retrieve.hits",
    "neighbours_report": "isdretrieve.retrieve.report",
    "bank_map": "isdretrieve.retrieve.map",
    "draw_map": "isdretrieve.retrieve.map",
    "write_dedup_report": "isdretrieve.retrieve.dedup_report",
    "build_index_from_checkpoint": "isdretrieve.pipeline",
    "build_index_from_embeddings": "isdretrieve.pipeline",
    # training and serving
    "Trainer": "isdretrieve.train.engine",
    "Recipe": "isdretrieve.train.recipe",
    "load_recipe": "isdretrieve.train.recipe",
    "create_app": "isdretrieve.serve.app",
    "open_indices": "isdretrieve.serve.app",
    "ServeSettings": "isdretrieve.serve.state",
}

__all__ = ["__version__", *sorted(_FACE)]


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use (importing only the module that defines it)."""
    module = _FACE.get(name)
    if module is None:
        raise AttributeError(f"module 'isdretrieve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_FACE})
