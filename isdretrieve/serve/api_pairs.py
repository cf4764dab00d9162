"""Mined-pairs routes: the pairs files of an index, a row's positives, the label audit."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi import Path as RoutePath
from starlette.exceptions import HTTPException

from isdretrieve.mine.audit import audit_paths, load_audit
from isdretrieve.retrieve.hits import label_differs
from isdretrieve.serve.payloads import row_json
from isdretrieve.serve.state import ServedIndex, served_index

router = APIRouter()
Index = Annotated[ServedIndex, Depends(served_index)]
Row = Annotated[int, RoutePath(ge=0, description="A bank row (0-based).")]


@router.get("/api/indices/{name}/pairs", summary="Mined pairs files in the index directory")
def pairs_list(one: Index) -> list[dict[str, Any]]:
    out = []
    for pairs_name, path in sorted(one.pairs_files.items()):
        pairs = one.pairs(pairs_name)
        out.append(
            {
                "name": pairs_name,
                "rows": len(pairs),
                "pairs": pairs.num_pairs,
                "coverage": pairs.coverage,
                "threshold": pairs.threshold,
                "params": asdict(pairs.params),
                "audit": audit_paths(path)[0].is_file(),
            }
        )
    return out


@router.get("/api/indices/{name}/pairs/{pairs_name}/rows/{row}", summary="A row's mined positives")
def pairs_of_row(one: Index, pairs_name: str, row: Row) -> dict[str, Any]:
    pairs, anchor = one.pairs(pairs_name), one.retriever.row(row)
    rows, similarities = pairs.positives(anchor.row)
    positives = []
    for r, s in zip(rows.tolist(), similarities.tolist(), strict=True):
        found = one.retriever.row(r)
        other = label_differs(anchor.label, found.label)
        positives.append({**row_json(one, found), "similarity": round(float(s), 6), "other_class": other})
    return {"anchor": row_json(one, anchor), "positives": positives}


@router.get("/api/indices/{name}/pairs/{pairs_name}/audit", summary="The label audit of a pairs file")
def pairs_audit(one: Index, pairs_name: str) -> dict[str, Any]:
    one.pairs(pairs_name)  # 404 for an unknown pairs name
    json_path = audit_paths(one.pairs_files[pairs_name])[0]
    if not json_path.is_file():
        raise HTTPException(404, f"pairs {pairs_name!r} have no audit (mine them with --audit)")
    return load_audit(json_path)
