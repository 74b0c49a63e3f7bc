"""Vowpal Wabbit, the reference online learner, on our Example rows (the peer of ``bench.quality``).

Each Example becomes one VW line: label ``1``/``-1``, importance ``1 / sample_rate`` for kept
negatives, one namespace per slot (``fid >> 48``) holding the fid's 48-bit hash as a feature,
and the dense values as ``|dense d0:v0 d1:v1 ...``. VW's plain online logistic regression
(``--loss_function logistic``, 18-bit weights, its default adaptive, normalized, invariant
updates, no interactions) predicts each example, then learns it, in the given (impression-time)
order - progressive validation, as our trainer. AUC is scikit-learn's, exact.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from sklearn.metrics import roc_auc_score

from schemas.fids import HASH_BITS
from trainer.ranking_model import target_labels

VW_ARGUMENTS = "--loss_function logistic --quiet -b 18"


def vw_lines(examples: pa.Table, labels: np.ndarray) -> list[str]:
    fids = examples.column("fids").combine_chunks()
    offsets = fids.offsets.to_numpy()
    flat = fids.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
    tokens = [f"|s{slot} {value:x}" for slot, value in zip((flat >> HASH_BITS).tolist(),
                                                            (flat & ((1 << HASH_BITS) - 1)).tolist())]
    dense = examples.column("dense").combine_chunks()
    values = dense.values.to_numpy(zero_copy_only=False).reshape(examples.num_rows, -1)
    rates = examples.column("sample_rate").to_numpy()
    starts = (offsets - offsets[0]).tolist()
    lines = []
    for i in range(examples.num_rows):
        head = "1" if labels[i] > 0 else ("-1" if rates[i] == 1 else f"-1 {1 / rates[i]:g}")
        body = " ".join(tokens[starts[i]:starts[i + 1]])
        if values.shape[1]:
            body += " |dense " + " ".join(f"d{j}:{v:.6g}" for j, v in enumerate(values[i]))
        lines.append(f"{head} {body}")
    return lines


def vw_progressive(examples: pa.Table, target: str, arguments: str = VW_ARGUMENTS) -> dict:
    """VW's progressive AUC and learning rate (examples/s, parsing included) on ``examples``."""
    from vowpalwabbit import Workspace

    labels = (target_labels(examples, target) > 0).astype(np.float64)
    lines = vw_lines(examples, labels)
    workspace = Workspace(arguments)
    scores = np.empty(len(lines))
    started = time.perf_counter()
    for i, line in enumerate(lines):
        example = workspace.parse(line)
        scores[i] = workspace.predict(example)
        workspace.learn(example)
        workspace.finish_example(example)
    seconds = time.perf_counter() - started
    workspace.finish()
    rates = examples.column("sample_rate").to_numpy()
    weights = np.where(labels > 0, 1.0, 1.0 / rates)
    return {"vw_auc": round(float(roc_auc_score(labels, scores, sample_weight=weights)), 5),
            "vw_examples_per_s": round(len(lines) / seconds)}
