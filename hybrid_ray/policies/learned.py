"""``--lengths learned``: a length predictor that reads the request, and predicts a distribution.

What it sees of a request (``features``): the prompt text (``Request.info.text``; token ids when the
prompt came as ids), the chat/completion kind, the model, the system-prompt hash (``PromptInfo``),
``max_tokens`` and the prompt length. Never ``Request.output_tokens``: for a simulated request that
is the truth the simulator ends it at (``tests/test_length_predictor.py`` poisons it).

The model, on log(1 + output tokens):

* text: unigrams and bigrams of the prompt's first 40 and last 20 words (instructions sit at either
  end), plus ``kind:``, ``model:`` and ``prefix:`` tokens, hashed (CRC-32, stable across processes)
  into ``HASH_DIM`` columns, each row scaled to unit length; the same columns again multiplied by the
  centred log prompt length (a task whose output follows its input, e.g. translation, gets its own
  slope); and the dense columns log(1 + prompt tokens), log(1 + max_tokens), has-max_tokens;
* a ridge regression on those columns gives a text score (out-of-fold on the training rows, 5 folds);
* with scikit-learn (the ``[predict]`` extra): ``HistGradientBoostingRegressor(loss="quantile")`` on
  (score, the dense columns), one per quantile (``QUANTILES``: p50 and p90); the ridge is sklearn's
  ``Ridge`` on the sparse columns. Without it: the ridge alone (numpy, closed form), whose out-of-fold
  residual quantiles shift its prediction to each quantile.

Quantiles are made monotone and capped at the request's ``max_tokens`` (``info.max_tokens``, else the
payload's; ``ignore_eos`` predicts ``max_tokens``); the point prediction (``predict``, what policies
use) is the median.

What teaches it: ``history`` rows (``history.load_history``: a workload file with text, an earlier run's
output joined with its batch input, or plain (prompt, output) pairs, e.g. a pilot run's), and this
run's completions (``observe``). It fits once it has ``MIN_FIT`` rows and refits when they have grown
by half (O(log n) fits; at most ``MAX_FIT_ROWS``, an even, deterministic subsample, per fit). Until its
first fit it answers as ``online`` does (``OnlinePredictor``, fed the same rows). Each fit predicts every
request it knows (the run's workload) in one batch; the published ``LearnedTable`` (``snapshot``) holds
those predictions and the fitted model for any other request, and its ``version`` moves when a fit
moves a known prediction by more than 10 % (and one token), after which queued work is re-predicted.
Deterministic given ``seed`` (fold split and boosting seed; sklearn runs on one thread).
"""
from __future__ import annotations

import contextlib
import math
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from ..workload import Request

QUANTILES: tuple[float, ...] = (0.5, 0.9)
HASH_DIM = 1024                   # hashed text columns (and as many interaction columns)
HEAD_WORDS, TAIL_WORDS = 40, 20
DENSE = 3                         # log(1 + prompt), log(1 + max_tokens), has max_tokens
LOG_PROMPT_CENTER = 4.5           # log(1 + 90 tokens): the interaction columns' zero
MIN_FIT = 32                      # rows before the first fit
GROWTH = 0.5                      # refit when the rows have grown by half since the last fit
MAX_FIT_ROWS = 4096               # rows one fit uses at most (an even subsample)
RIDGE_ALPHA = 1.0
FOLDS = 5
PRIOR_TOKENS = 256                # the answer with nothing learned (as ``online``'s), capped at max_tokens
THRESHOLD = 0.1                   # a fit republishes when a known prediction moves by more than this
_WORD = re.compile(r"[a-z0-9]+")


# -- features: what the predictor may read ----------------------------------------------------------

def max_tokens_of(req: Request) -> int | None:
    """The request's bound on its output: its PromptInfo's, else its payload's; None when unknown."""
    info = req.info
    if info is not None and info.max_tokens is not None:
        return info.max_tokens
    if req.payload is not None:
        return req.payload.sampling.max_tokens
    return None


def tokens_of(req: Request) -> list[str]:
    """The text tokens the model hashes: prompt words (head and tail, unigrams and bigrams) or token
    ids, and the kind, model and system-prompt hash. Reads ``info`` and ``payload``, nothing else."""
    info, payload = req.info, req.payload
    text = info.text if info is not None else ""
    if text:
        words = _WORD.findall(text.lower())
    else:
        ids = info.token_ids if info is not None and info.token_ids else (payload.token_ids if payload else ())
        words = [f"#{t}" for t in ids]
    out: list[str] = []
    spans = (words,) if len(words) <= HEAD_WORDS + TAIL_WORDS else (words[:HEAD_WORDS], words[-TAIL_WORDS:])
    for ws in spans:
        out += ws
        out += [f"{a} {b}" for a, b in zip(ws, ws[1:])]
    model = info.model if info is not None and info.model else (payload.group if payload is not None else "")
    if info is not None and info.kind:
        out.append(f"kind:{info.kind}")
    if model:
        out.append(f"model:{model}")
    if info is not None and info.prefix:
        out.append(f"prefix:{info.prefix}")
    return out


def features(req: Request) -> tuple[np.ndarray, np.ndarray]:
    """(hashed column indices, sorted and unique; dense columns) of one request."""
    cols = np.unique(np.fromiter((zlib.crc32(t.encode("utf-8", "replace")) % HASH_DIM for t in tokens_of(req)),
                                 dtype=np.int64))
    mt = max_tokens_of(req)
    dense = np.array([math.log1p(req.prompt_tokens), math.log1p(mt) if mt else 0.0, 1.0 if mt else 0.0])
    return cols, dense


def _design(rows: list[tuple[np.ndarray, np.ndarray]]):
    """(row indices, column indices, values) of the sparse design and the dense block."""
    dense = np.array([d for _, d in rows], dtype=np.float64).reshape(len(rows), DENSE)
    ri, ci, vals = [], [], []
    for k, (cols, d) in enumerate(rows):
        if not len(cols):
            continue
        v = 1.0 / math.sqrt(len(cols))
        slope = v * (d[0] - LOG_PROMPT_CENTER)
        ri.append(np.full(2 * len(cols), k))
        ci.append(np.concatenate([cols, cols + HASH_DIM]))
        vals.append(np.concatenate([np.full(len(cols), v), np.full(len(cols), slope)]))
    if ri:
        return np.concatenate(ri), np.concatenate(ci), np.concatenate(vals), dense
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), dense


def _dense_matrix(rows) -> np.ndarray:
    ri, ci, vals, dense = _design(rows)
    x = np.zeros((len(rows), 2 * HASH_DIM + DENSE))
    x[ri, ci] = vals
    x[:, 2 * HASH_DIM:] = dense
    return x


def _sparse_matrix(rows):
    from scipy.sparse import csr_matrix, hstack

    ri, ci, vals, dense = _design(rows)
    return hstack([csr_matrix((vals, (ri, ci)), shape=(len(rows), 2 * HASH_DIM)), csr_matrix(dense)]).tocsr()


def sklearn_available() -> bool:
    try:
        import sklearn.ensemble  # noqa: F401
        import scipy.sparse  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _one_thread():
    """sklearn and BLAS on one thread: the same numbers on any machine, and no oversubscribed cores."""
    try:
        from threadpoolctl import threadpool_limits
        import sklearn.ensemble  # noqa: F401  (its OpenMP runtime loaded first: threadpoolctl limits loaded ones)
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


def _folds(n: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[k::FOLDS] for k in range(FOLDS)]


# -- the two back ends: fit on (rows, log lengths), predict quantiles in log space --------------------

class RidgeModel:
    """numpy only: ridge on the design (dual form, closed form), quantiles from out-of-fold residuals."""

    backend = "numpy"

    def __init__(self, rows, y: np.ndarray, seed: int = 0):
        x = _dense_matrix(rows)
        self.mean_x, self.mean_y = x.mean(axis=0), float(y.mean())
        self.w = self._solve(x - self.mean_x, y - self.mean_y)
        oof = np.empty(len(y))
        if len(y) >= 2 * FOLDS:
            for val in _folds(len(y), seed):
                trn = np.setdiff1d(np.arange(len(y)), val)
                mx, my = x[trn].mean(axis=0), y[trn].mean()
                oof[val] = (x[val] - mx) @ self._solve(x[trn] - mx, y[trn] - my) + my
        else:
            oof = (x - self.mean_x) @ self.w + self.mean_y
        self.shift = np.quantile(y - oof, QUANTILES)

    @staticmethod
    def _solve(xc: np.ndarray, yc: np.ndarray) -> np.ndarray:
        n, d = xc.shape
        if n <= d:
            return xc.T @ np.linalg.solve(xc @ xc.T + RIDGE_ALPHA * np.eye(n), yc)
        return np.linalg.solve(xc.T @ xc + RIDGE_ALPHA * np.eye(d), xc.T @ yc)

    def predict(self, rows) -> np.ndarray:
        """(n, len(QUANTILES)) log-length quantiles."""
        base = (_dense_matrix(rows) - self.mean_x) @ self.w + self.mean_y
        return base[:, None] + self.shift[None, :]


class BoostedModel:
    """scikit-learn: a sparse ``Ridge`` text score (out of fold on the training rows), then one
    ``HistGradientBoostingRegressor(loss="quantile")`` per quantile on (score, dense columns)."""

    backend = "sklearn"

    def __init__(self, rows, y: np.ndarray, seed: int = 0):
        from sklearn.ensemble import HistGradientBoostingRegressor
        from sklearn.linear_model import Ridge

        x = _sparse_matrix(rows)
        self.ridge = Ridge(alpha=RIDGE_ALPHA).fit(x, y)
        if len(y) >= 2 * FOLDS:
            score = np.empty(len(y))
            for val in _folds(len(y), seed):
                trn = np.setdiff1d(np.arange(len(y)), val)
                score[val] = Ridge(alpha=RIDGE_ALPHA).fit(x[trn], y[trn]).predict(x[val])
        else:
            score = self.ridge.predict(x)
        z = np.column_stack([score, x[:, 2 * HASH_DIM:].toarray()])
        leaf = max(5, min(20, len(y) // 20))
        self.boosted = [HistGradientBoostingRegressor(loss="quantile", quantile=q, max_iter=200, learning_rate=0.05,
                                                      min_samples_leaf=leaf, early_stopping=False,
                                                      random_state=seed).fit(z, y) for q in QUANTILES]

    def predict(self, rows) -> np.ndarray:
        x = _sparse_matrix(rows)
        z = np.column_stack([self.ridge.predict(x), x[:, 2 * HASH_DIM:].toarray()])
        return np.column_stack([m.predict(z) for m in self.boosted])


def fit_model(rows, lengths, seed: int = 0, backend: str = "auto"):
    """A fitted model (``BoostedModel`` with scikit-learn, else ``RidgeModel``) on log(1 + lengths)."""
    y = np.log1p(np.asarray(lengths, dtype=np.float64))
    use = backend if backend != "auto" else ("sklearn" if sklearn_available() else "numpy")
    with _one_thread():
        return (BoostedModel if use == "sklearn" else RidgeModel)(rows, y, seed)


def to_tokens(log_q: np.ndarray, caps: list[int | None]) -> list[tuple[int, ...]]:
    """Log-length quantile rows -> token counts: >= 1, monotone, capped at each request's max_tokens."""
    q = np.maximum.accumulate(np.expm1(np.asarray(log_q, dtype=np.float64)), axis=1)
    out = []
    for row, cap in zip(q, caps):
        vals = [max(1, int(round(v))) for v in row]
        if cap is not None:
            vals = [min(v, cap) for v in vals]
        out.append(tuple(vals))
    return out


# -- the published table and the predictor ------------------------------------------------------------

def _key(req: Request) -> tuple[str, int]:
    return req.id, req.prompt_tokens


def _ignores_eos(req: Request) -> bool:
    return req.payload is not None and req.payload.sampling.ignore_eos


@dataclass(frozen=True, slots=True)
class LearnedTable:
    """One published version of the learned predictions: plain data (crosses Ray actor boundaries).

    ``values[(id, prompt_tokens)]`` = the quantiles of a request the predictor knew when it fitted;
    any other request goes through ``model`` (or, before the first fit, the ``fallback`` online table).
    """

    version: int
    values: dict[tuple[str, int], tuple[int, ...]] = field(default_factory=dict)
    model: Any = None
    fallback: Any = None
    name: str = "learned"

    def quantiles(self, req: Request) -> tuple[int, ...]:
        """(p50, p90) output tokens, capped at max_tokens (``QUANTILES``)."""
        got = self.values.get(_key(req))
        if got is not None:
            return got
        cap = max_tokens_of(req)
        if _ignores_eos(req):
            return (cap,) * len(QUANTILES)
        if self.model is None:
            p = self.fallback.predict(req) if self.fallback is not None else PRIOR_TOKENS
            p = min(p, cap) if cap is not None else p
            return (p, cap if cap is not None else 4 * p)
        return to_tokens(self.model.predict([features(req)]), [cap])[0]

    def predict(self, req: Request) -> int:
        return self.quantiles(req)[0]


class LearnedPredictor:
    """``--lengths learned`` (module docstring). ``requests``: the run's workload (predicted in one
    batch per fit); ``history``: (prompt, output) pairs, each optionally carrying its ``request``
    (``history.HistoryRow``) whose prompt features it learns from."""

    name = "learned"

    def __init__(self, requests: Iterable[Request] = (), history: Iterable = (), seed: int = 0,
                 backend: str = "auto", fallback: Any = None):
        self.seed, self.backend = seed, backend
        self.known: dict[tuple[str, int], tuple[Request, tuple[np.ndarray, np.ndarray]]] = {}
        for q in requests:
            self.known.setdefault(_key(q), (q, features(q)))
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []
        self.lengths: list[int] = []
        pairs = []
        for item in history:
            p, o = item[0], item[1]
            req = getattr(item, "request", None) or Request(f"history-{len(self.rows)}", int(p), 1)
            self.rows.append(features(req))
            self.lengths.append(int(o))
            pairs.append((int(p), int(o)))
        self.history = len(self.rows)
        self.observed = 0
        self.fits = 0
        self._fit_rows = 0
        self.model = None
        # answers until the first fit: ``fallback(pairs)``, the online predictor (``make_predictor``)
        self.online = fallback(pairs) if fallback is not None else _Constant()
        self._online_version = self.online.version
        self.table = LearnedTable(0, {}, None, self.online.snapshot())
        if len(self.rows) >= MIN_FIT:
            self._fit()
            self.table = LearnedTable(0, self._predict_known(), self.model, None)

    @property
    def version(self) -> int:
        return self.table.version

    def predict(self, req: Request) -> int:
        return self.table.predict(req)

    def quantiles(self, req: Request) -> tuple[int, ...]:
        """(p50, p90) output tokens of ``req`` (``QUANTILES``), capped at its max_tokens."""
        return self.table.quantiles(req)

    def snapshot(self) -> LearnedTable:
        return self.table

    def observe(self, req: Request, true_len: int) -> None:
        """A request finished with ``true_len`` output tokens: a training row; refit when they grew by half."""
        self.observed += 1
        got = self.known.get(_key(req))
        self.rows.append(got[1] if got is not None else features(req))
        self.lengths.append(int(true_len))
        if self.model is None:
            self.online.observe(req, true_len)
        if len(self.rows) >= max(MIN_FIT, (1.0 + GROWTH) * self._fit_rows):
            self._fit()
            self._publish(self._predict_known(), self.model, None)
        elif self.model is None and self.online.version != self._online_version:
            self._online_version = self.online.version
            self._publish({}, None, self.online.snapshot(), force=True)

    # -- internals --------------------------------------------------------------------------------
    def _fit(self) -> None:
        n = len(self.rows)
        idx = np.arange(n) if n <= MAX_FIT_ROWS else np.unique(np.linspace(0, n - 1, MAX_FIT_ROWS).round().astype(int))
        self.model = fit_model([self.rows[k] for k in idx], [self.lengths[k] for k in idx], self.seed, self.backend)
        self._fit_rows = n
        self.fits += 1

    def _predict_known(self) -> dict[tuple[str, int], tuple[int, ...]]:
        if not self.known:
            return {}
        keys = list(self.known)
        reqs = [self.known[k][0] for k in keys]
        with _one_thread():
            log_q = self.model.predict([self.known[k][1] for k in keys])
        vals = to_tokens(log_q, [max_tokens_of(q) for q in reqs])
        for k, q in enumerate(reqs):
            if _ignores_eos(q):
                vals[k] = (max_tokens_of(q),) * len(QUANTILES)
        return dict(zip(keys, vals))

    def _publish(self, values, model, fallback, force: bool = False) -> None:
        """A new table (version + 1) when a known prediction moved beyond the threshold (or the
        first fit replaces the online answers); else the published one stays."""
        old = self.table
        moved = force or old.model is None or any(
            abs(v[0] - old.values.get(k, (0,))[0]) > max(THRESHOLD * old.values.get(k, (0,))[0], 1.0)
            for k, v in values.items())
        if moved:
            self.table = LearnedTable(old.version + 1, values, model, fallback)


class _Constant:
    """The answer before any fit when no fallback is given: ``PRIOR_TOKENS`` for every request."""

    version = 0

    def __init__(self, pairs=()):
        pass

    def predict(self, req: Request) -> int:
        return PRIOR_TOKENS

    def observe(self, req: Request, true_len: int) -> None:
        """Learns nothing."""

    def snapshot(self) -> "_Constant":
        return self
