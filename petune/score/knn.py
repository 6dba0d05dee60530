"""kNN classification over embeddings: the weighted vote of DINO (Caron et al., 2021) and a plain
majority vote, neighbours found with an exact FAISS inner-product index."""

from __future__ import annotations

import numpy as np

from .retrieval import check_embeddings


def _neighbours(train, test, k):
    import faiss

    train = check_embeddings(train, "train embeddings").copy()
    test = check_embeddings(test, "test embeddings", dim=train.shape[1]).copy()
    faiss.normalize_L2(train)
    faiss.normalize_L2(test)  # cosine similarity
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    return index.search(test, k)


def knn_predict(train_embeddings, train_labels, test_embeddings, k: int = 20, temperature: float = 0.07,
                vote: str = "weighted") -> np.ndarray:
    """Predict labels of test embeddings from their ``k`` nearest train embeddings (cosine).

    Args:
        train_embeddings: ``[n_train, d]``; test_embeddings: ``[n_test, d]``.
        train_labels: ``n_train`` labels (any hashable).
        k: neighbours (default 20, DINO's); more than ``n_train`` raises.
        temperature: ``T`` of the weighted vote (default 0.07, DINO's).
        vote: ``"weighted"`` — each neighbour adds ``exp(similarity / T)`` to its label (DINO);
            ``"majority"`` — each neighbour adds 1, ties going to the tied label with the nearest
            neighbour.

    Returns:
        ``[n_test]`` array of predicted labels.

    Raises:
        ValueError: bad ``k`` / ``temperature`` / ``vote``, label count mismatch, NaN/inf embeddings,
            dimension mismatch.
    """
    labels = np.asarray(list(train_labels), dtype=object)
    if len(labels) != len(train_embeddings):
        raise ValueError(f"{len(labels)} train labels for {len(train_embeddings)} train embeddings")
    if not isinstance(k, int) or not 1 <= k <= len(labels):
        raise ValueError(f"k must be an integer in [1, n_train={len(labels)}], got {k!r}")
    if vote not in ("weighted", "majority"):
        raise ValueError(f"vote must be 'weighted' or 'majority', got {vote!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    sims, idx = _neighbours(train_embeddings, test_embeddings, k)
    classes, codes = np.unique(labels.astype(str), return_inverse=True)
    by_code = {}
    for code, label in zip(codes, labels):
        by_code.setdefault(code, label)
    neighbour_codes = codes[idx]  # [n_test, k], nearest first
    weights = np.exp(sims / temperature) if vote == "weighted" else np.ones_like(sims)
    votes = np.zeros((len(idx), len(classes)))
    np.add.at(votes, (np.arange(len(idx))[:, None], neighbour_codes), weights)
    preds = []
    for row_votes, row_codes in zip(votes, neighbour_codes):
        best = np.flatnonzero(row_votes == row_votes.max())
        # ties: the tied label that appears first among the neighbours (nearest first)
        winner = next(c for c in row_codes if c in best) if len(best) > 1 else best[0]
        preds.append(by_code[winner])
    return np.asarray(preds, dtype=object)


def knn_scores(train_embeddings, train_labels, test_embeddings, test_labels, **kwargs) -> dict[str, float]:
    """Accuracy and macro-F1 (scikit-learn) of :func:`knn_predict`."""
    from sklearn.metrics import accuracy_score, f1_score

    pred = knn_predict(train_embeddings, train_labels, test_embeddings, **kwargs)
    truth = np.asarray(list(test_labels), dtype=object)
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} test labels for {len(pred)} test embeddings")
    return {"accuracy": float(accuracy_score(truth.astype(str), pred.astype(str))),
            "macro_f1": float(f1_score(truth.astype(str), pred.astype(str), average="macro"))}
