"""Offline metrics: normalised exact match for QA, CIDEr-D (and SPIDEr when SPICE runs) for captions.

CIDEr-D follows Vedantam et al., "CIDEr: Consensus-based Image Description Evaluation"
(CVPR 2015), section 4 and its CIDEr-D variant:

    g_k(s)    = h_k(s) * log(|I| / max(1, df_k))      TF-IDF weight of n-gram k in sentence s
    CIDEr-D_n = 10/m * sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                      * <min(g(c), g(s_j)), g(s_j)> / (||g(c)|| ||g(s_j)||)
    CIDEr-D   = mean over n = 1..4 of CIDEr-D_n,     sigma = 6

h_k(s) is the raw count of n-gram k in s, |I| the number of clips in the evaluated set and
df_k the number of clips whose references contain k. Taking the minimum of the two TF-IDF
weights clips the candidate's count of k to the reference's count (both share the same IDF),
which is what stops a candidate from scoring by repeating a frequent n-gram. Raw counts are
what the widely used COCO evaluation code weighs with, so scores are comparable to published
tables. The length l is the number of words.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence

SIGMA = 6.0
MAX_N = 4
_ARTICLES = {"a", "an", "the"}
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
SPICE_UNAVAILABLE = "SPICE unavailable"


def tokenize(text: str) -> list[str]:
    """Lower-case words and numbers; punctuation dropped ("Dog's bark!" -> ["dog's", "bark"])."""
    return _WORD.findall(text.lower())


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces: the form exact match compares."""
    return " ".join(w for w in tokenize(text) if w not in _ARTICLES)


def exact_match(prediction: str, references: Sequence[str]) -> bool:
    """True when the normalised prediction equals any normalised reference."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(r) for r in references)


def _ngram_counts(words: list[str]) -> list[Counter]:
    """Counts of the 1..4-grams of `words`, one Counter per n."""
    return [Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1)) for n in range(1, MAX_N + 1)]


def _tfidf(counts: Counter, idf: dict, log_clips: float) -> tuple[dict, float]:
    vector = {gram: count * idf.get(gram, log_clips) for gram, count in counts.items()}
    return vector, math.sqrt(sum(v * v for v in vector.values()))


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (the mean over clips) and the per-clip scores.

    `candidates[i]` is the generated caption of clip i and `references[i]` its reference captions.
    The IDF comes from the references of this whole set, so scores depend on the set evaluated.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise ValueError("CIDEr-D of an empty set is undefined")
    if any(not refs for refs in references):
        raise ValueError("every clip needs at least one reference caption")
    ref_words = [[tokenize(r) for r in refs] for refs in references]
    ref_counts = [[_ngram_counts(w) for w in clip] for clip in ref_words]
    document_frequency: Counter = Counter()
    for clip in ref_counts:
        document_frequency.update({gram for counts in clip for per_n in counts for gram in per_n})
    log_clips = math.log(len(candidates))
    # An n-gram no reference has (df = 0) gets max(1, df) = 1, i.e. the largest IDF, log |I|.
    idf = {gram: log_clips - math.log(df) for gram, df in document_frequency.items()}
    scores = []
    for candidate, clip_words, clip_counts in zip(candidates, ref_words, ref_counts):
        cand_words = tokenize(candidate)
        cand_vectors = [_tfidf(c, idf, log_clips) for c in _ngram_counts(cand_words)]
        total = 0.0
        for words, counts in zip(clip_words, clip_counts):
            penalty = math.exp(-((len(cand_words) - len(words)) ** 2) / (2 * SIGMA**2))
            for (cand_vec, cand_norm), ref_counts_n in zip(cand_vectors, counts):
                ref_vec, ref_norm = _tfidf(ref_counts_n, idf, log_clips)
                if cand_norm == 0.0 or ref_norm == 0.0:
                    continue
                clipped = sum(min(w, ref_vec[g]) * ref_vec[g] for g, w in cand_vec.items() if g in ref_vec)
                total += penalty * clipped / (cand_norm * ref_norm)
        scores.append(10.0 * total / (MAX_N * len(clip_words)))
    return sum(scores) / len(scores), scores


def find_spice() -> tuple[str, str] | None:
    """(java, SPICE jar) when both are present: the jar from $SPICE_JAR, java from PATH."""
    java, jar = shutil.which("java"), os.environ.get("SPICE_JAR")
    if java and jar and os.path.isfile(jar):
        return java, jar
    return None


def spice(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, list[float]] | str:
    """Corpus SPICE F-score and per-clip scores via the SPICE jar, or SPICE_UNAVAILABLE.

    SPICE needs Java and the SPICE 1.0 jar (with its Stanford CoreNLP models), pointed to by
    $SPICE_JAR. Neither ships with this package; without them the caller reports the string.
    """
    found = find_spice()
    if found is None:
        return SPICE_UNAVAILABLE
    java, jar = found
    with tempfile.TemporaryDirectory() as tmp:
        request, result = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(request, "w") as f:
            json.dump(
                [{"image_id": i, "test": c, "refs": list(r)} for i, (c, r) in enumerate(zip(candidates, references))], f
            )
        run = subprocess.run(
            [java, "-Xmx8G", "-jar", jar, request, "-out", result, "-subset", "-silent"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(jar),
        )
        if run.returncode != 0:
            raise RuntimeError(f"SPICE ({jar}) failed with exit code {run.returncode}: {run.stderr.strip()[-500:]}")
        with open(result) as f:
            by_id = {item["image_id"]: float(item["scores"]["All"]["f"]) for item in json.load(f)}
    scores = [by_id[i] for i in range(len(candidates))]
    return sum(scores) / len(scores), scores
