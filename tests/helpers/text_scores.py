"""ROUGE-L and chrF from their definitions, to check the pipeline's scores against: a word
LCS; character n-gram precision and recall averaged over orders 1-6, then F-beta with
beta 2. Written from the papers, not from rouge_score or sacrebleu."""

from __future__ import annotations

import re
import statistics
from collections import Counter


def reference_rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 over lower-cased alphanumeric words (Lin 2004, as rouge_score tokenizes)."""

    def words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    a, r = words(answer), words(reference)
    if not a or not r:
        return 0.0
    lcs = [[0] * (len(r) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(r):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if x == y else max(lcs[i][j + 1], lcs[i + 1][j])
    n = lcs[-1][-1]
    if n == 0:
        return 0.0
    precision, recall = n / len(a), n / len(r)
    return 2 * precision * recall / (precision + recall)


def reference_chrf(answer: str, reference: str, order: int = 6, beta: float = 2.0) -> float:
    """chrF (Popovic 2015, sacreBLEU 2 conventions): whitespace removed, character n-grams
    of orders 1..6; precision and recall averaged over the orders both sides have, then
    F-beta; 0-100."""
    a, r = "".join(answer.split()), "".join(reference.split())
    precisions, recalls = [], []
    for n in range(1, order + 1):
        hyp = Counter(a[i : i + n] for i in range(len(a) - n + 1))
        ref = Counter(r[i : i + n] for i in range(len(r) - n + 1))
        if not hyp or not ref:
            continue
        match = sum((hyp & ref).values())
        precisions.append(match / sum(hyp.values()))
        recalls.append(match / sum(ref.values()))
    if not precisions:
        return 0.0
    p, rc = statistics.fmean(precisions), statistics.fmean(recalls)
    if p + rc == 0:
        return 0.0
    return 100 * (1 + beta**2) * p * rc / (beta**2 * p + rc)
