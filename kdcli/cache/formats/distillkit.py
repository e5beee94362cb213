"""DistillKit's compressed top-k captures (``--format distillkit``, import only): a decoder written from its spec.

Read from arcee-ai/DistillKit at commit a61c2e7 (``distillkit/compression/{config,compressor,monotonic_logprobs,
bitpack}.py``, ``distillkit/sample_logits_vllm.py``, ``distillkit/sample_common.py``, ``distillkit/pack_logits.py``);
no DistillKit code is used or copied. What a capture is:

- a directory of Parquet files (``data_0.parquet``, ...) with ``input_ids`` list<uint64>,
  ``compressed_logprobs`` list<list<uint8>> and ``bytepacked_indices`` list<list<uint8>> (one inner list per
  position), beside ``compression_config.yaml`` (the ``DistributionQuantizationConfig``: ``d``, ``k``, ``exact_k``,
  ``exact_dtype``, ``polynomial_terms``, ``term_dtype``, ``residual_bins``, ``delta_encoding``,
  ``error_diffusion``, ``normalize_t``);
- position ``t`` holds vLLM's prompt log-probs (``logprobs_mode="raw_logprobs"``, temperature 1: the teacher's
  log-softmax at T = 1) of token ``t + 1``: the first (empty) prompt position is dropped, and the capture appends one
  pad token so the last text token gets a distribution too; the top ``k`` (by vLLM's rank) are sorted by log-prob,
  largest first;
- ids: ``ceil(log2(d))`` bits each, packed most significant bit first into bytes;
- log-probs, per position: (optionally delta-encoded: the first value, then differences) the first ``exact_k`` cast
  to ``exact_dtype`` and stored as raw little-endian bytes; the other ``k - exact_k`` are *approximated*: a
  least-squares fit of ``sum_j c_j X_j(i)`` over the terms (``i`` = 0.. k - exact_k - 1, or ``linspace(0, 1)``
  with ``normalize_t``; ``X_j = i^n`` or ``sqrt(i)`` / ``exp(i)``), the coefficients stored in ``term_dtype``,
  plus optionally residuals quantised per bin (a scale in ``scale_dtype`` = max |residual| / 2^(bits - 1), elements
  stored as ``round(r / scale) + 2^(bits - 1)`` in ``element_bits`` bits, MSB first; 1-bit bins store the sign);
- ``distillkit-pack-logits`` packs rows to a fixed length: ``attention_mask`` then numbers the documents 1, 2, ...
  and ``input_ids`` is cut to the positions' count, so each document's last position predicts a token the packing
  removed.

**What is exact.** The decoding is exact: :func:`decode_logprobs` reproduces DistillKit's own decompression
arithmetic (same dtypes, same operations, in torch). The *content* is exact only for the first ``exact_k`` ranks
(to ``exact_dtype``: float32 is vLLM's own precision; bfloat16 keeps 8 significant bits, 2^-9 relative, coarser
than kdcli's fp16) and the ids; ranks ``exact_k..k`` are a polynomial approximation (measured in docs/formats.md).
So by default (``ranks="exact"``) the import keeps the top ``exact_k`` ids and log-probs and their exact tail mass
``1 - sum`` (the mass outside them): a kdcli ``topk`` cache with k = exact_k, exact at T = 1. ``ranks="all"``
keeps all k decoded values (sorted again: the fit need not be monotone), states in the manifest that ranks
``exact_k..k`` are approximate, and derives the tail from them (renormalising a position whose decoded mass
exceeds 1). The legacy format (``packed_indices``/``exact_values``/``coeffs``: mean-centred *logits* whose
normaliser was never stored) and raw ``token_ids``/``top_values`` rows are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcli.cache.formats.base import Format
from kdcli.cache.formats.common import (
    TOKENS_FILE,
    UNRECORDED,
    Advance,
    Imported,
    TokenRowsWriter,
    imported_token_plan,
    pyarrow_modules,
    token_data_identity,
    unrecorded_teacher,
    write_cache,
)
from kdcli.cache.manifest import write_manifest
from kdcli.cache.modes.base import numpy_id_dtype
from kdcli.infra.errors import CacheError, UsageError

FORMAT_NAME = "distillkit"
CONFIG_NAME = "compression_config.yaml"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
SPECIAL_TERMS = ("sqrt", "exp")
RANKS = ("exact", "all")
MASS_TOL = 1e-2  # a position whose decoded probabilities sum past 1 + this is not log-probs (kdcli's NORM_TOL)


@dataclass(frozen=True)
class QuantBin:
    scale_dtype: str
    element_bits: int
    num_elements: int


@dataclass(frozen=True)
class CompressionConfig:
    """DistillKit's ``DistributionQuantizationConfig`` (distillkit/compression/config.py), the fields the byte
    layout depends on."""

    d: int
    k: int
    exact_k: int
    exact_dtype: str = "float32"
    polynomial_terms: tuple = ()
    term_dtype: str = "float32"
    residual_bins: tuple = ()
    delta_encoding: bool = True
    error_diffusion: bool = False
    normalize_t: bool = False

    @classmethod
    def from_dict(cls, d: dict, where: str = "the compression config") -> CompressionConfig:
        if not isinstance(d, dict):
            raise UsageError(f"{where} is not a mapping")
        try:
            bins = tuple(
                QuantBin(str(b["scale_dtype"]), int(b["element_bits"]), int(b["num_elements"]))
                for b in d.get("residual_bins") or ()
            )
            terms = tuple(t if isinstance(t, str) else int(t) for t in d.get("polynomial_terms") or ())
            cfg = cls(
                d=int(d["d"]),
                k=int(d["k"]),
                exact_k=int(d["exact_k"]),
                exact_dtype=str(d.get("exact_dtype", "float32")),
                polynomial_terms=terms,
                term_dtype=str(d.get("term_dtype", "float32")),
                residual_bins=bins,
                delta_encoding=bool(d.get("delta_encoding", True)),
                error_diffusion=bool(d.get("error_diffusion", False)),
                normalize_t=bool(d.get("normalize_t", False)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise UsageError(f"{where} is not a DistillKit compression config ({e.__class__.__name__}: {e})") from None
        cfg.check(where)
        return cfg

    def check(self, where: str) -> None:
        bad = [t for t in self.polynomial_terms if isinstance(t, str) and t not in SPECIAL_TERMS]
        if (
            bad
            or any(dt not in DTYPES for dt in (self.exact_dtype, self.term_dtype))
            or any(b.scale_dtype not in DTYPES or not 1 <= b.element_bits <= 64 for b in self.residual_bins)
        ):
            raise UsageError(f"{where}: unsupported term, dtype or bin ({self})")
        if not (0 <= self.exact_k <= self.k and self.d > 1):
            raise UsageError(f"{where}: needs d > 1 and 0 <= exact_k <= k")
        if self.exact_k < self.k and not self.polynomial_terms and not self.residual_bins:
            raise UsageError(f"{where}: exact_k < k needs polynomial_terms or residual_bins")
        if sum(b.num_elements for b in self.residual_bins) > self.k - self.exact_k:
            raise UsageError(f"{where}: residual bins hold more than k - exact_k elements")

    @property
    def index_bits(self) -> int:
        return int(math.ceil(math.log2(self.d)))

    def logprob_bytes(self) -> int:
        """Bytes of one position's compressed log-probs (DistillKit's ``logprob_bits() / 8``)."""
        bits = self.exact_k * width(self.exact_dtype) * 8 + len(self.polynomial_terms) * width(self.term_dtype) * 8
        for b in self.residual_bins:
            bits += -(-(width(b.scale_dtype) * 8 + b.element_bits * b.num_elements) // 8) * 8
        return -(-bits // 8)

    def index_bytes(self) -> int:
        return -(-self.k * self.index_bits // 8)


def width(dtype: str) -> int:
    return torch.empty(0, dtype=DTYPES[dtype]).element_size()


# -- bits -----------------------------------------------------------------------------------------------------------
def unpack_bits(b: np.ndarray, bits: int, count: int) -> np.ndarray:
    """(n, M) uint8 -> (n, count) int64: ``count`` unsigned integers of ``bits`` bits, most significant bit first
    (DistillKit's ``unpack_from_bytes``)."""
    flat = np.unpackbits(np.ascontiguousarray(b, dtype=np.uint8), axis=-1)[:, : count * bits]
    if flat.shape[1] < count * bits:
        raise CacheError(f"{b.shape[1]} bytes hold fewer than {count} values of {bits} bits")
    powers = 1 << np.arange(bits - 1, -1, -1, dtype=np.uint64)
    return (flat.reshape(len(b), count, bits).astype(np.uint64) * powers).sum(axis=-1).astype(np.int64)


def pack_bits(x: np.ndarray, bits: int) -> np.ndarray:
    """(n, count) non-negative ints -> (n, ceil(count * bits / 8)) uint8, MSB first (DistillKit's
    ``pack_to_bytes``)."""
    x = np.asarray(x, dtype=np.uint64) & np.uint64((1 << bits) - 1)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    b = ((x[..., None] >> shifts) & np.uint64(1)).astype(np.uint8).reshape(len(x), -1)
    return np.packbits(b, axis=-1)


def term_matrix(cfg: CompressionConfig, t: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(t, terms) in ``dtype`` (default ``term_dtype``): DistillKit's ``polynomial_terms`` (arange or
    linspace(0, 1) points, each raised to a power or passed through sqrt / exp)."""
    dt = dtype or DTYPES[cfg.term_dtype]
    pts = torch.linspace(0, 1, steps=t, dtype=dt) if cfg.normalize_t else torch.arange(t, dtype=dt)
    return torch.stack([pts**i if isinstance(i, int) else getattr(torch, i)(pts) for i in cfg.polynomial_terms], dim=-1)


def view_as(b: np.ndarray, dtype: str, count: int) -> torch.Tensor:
    """(n, count * width) little-endian bytes -> (n, count) values of ``dtype``."""
    return torch.from_numpy(np.ascontiguousarray(b)).view(DTYPES[dtype]).reshape(len(b), count)


def decode_logprobs(b: np.ndarray, cfg: CompressionConfig) -> torch.Tensor:
    """(n, logprob_bytes) uint8 -> (n, k) decoded log-probs, exactly as DistillKit's
    ``decompress_monotonic_logprobs`` computes them (out dtype: float32 without delta encoding, ``exact_dtype``
    with it)."""
    if b.shape[1] != cfg.logprob_bytes():
        raise CacheError(
            f"compressed_logprobs has {b.shape[1]} bytes per position, the config gives "
            f"{cfg.logprob_bytes()}: the capture was made with another compression config"
        )
    out_dt = DTYPES[cfg.exact_dtype]
    n, at = len(b), 0
    nb = cfg.exact_k * width(cfg.exact_dtype)
    exact = view_as(b[:, :nb], cfg.exact_dtype, cfg.exact_k) if cfg.exact_k else torch.empty((n, 0), dtype=out_dt)
    at = nb
    coeffs = None
    if cfg.polynomial_terms:
        nt = len(cfg.polynomial_terms)
        coeffs = view_as(b[:, at : at + nt * width(cfg.term_dtype)], cfg.term_dtype, nt)
        at += nt * width(cfg.term_dtype)
    residuals = []
    for qb in cfg.residual_bins:
        sw = width(qb.scale_dtype)
        scale = view_as(b[:, at : at + sw], qb.scale_dtype, 1)
        at += sw
        nbytes = -(-qb.num_elements * qb.element_bits // 8)
        q = torch.from_numpy(unpack_bits(b[:, at : at + nbytes], qb.element_bits, qb.num_elements))
        at += nbytes
        if qb.element_bits == 1:
            residuals.append((q.to(torch.float32) * 2.0 - 1.0) * scale)
        else:
            residuals.append((q + -(2 ** (qb.element_bits - 1))).to(torch.float32) * scale)
    m = cfg.k - cfg.exact_k
    if residuals:
        res = torch.cat(residuals, dim=-1)
        res = torch.nn.functional.pad(res, (0, m - res.shape[-1]))
    else:
        res = torch.zeros((n, m), dtype=out_dt)
    if coeffs is not None:
        fit = torch.sum(term_matrix(cfg, m).to(coeffs.dtype) * coeffs.unsqueeze(-2), dim=-1)
        approx = fit + res.to(out_dt)
    else:
        approx = res.to(out_dt)
    lp = torch.cat([exact.to(out_dt), approx], dim=-1)
    if cfg.delta_encoding:
        lp = torch.cumsum(lp.float(), dim=-1).to(out_dt)
    return lp


def least_squares(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """(t, terms), (n, t) -> (n, terms) coefficients by the SVD pseudo-inverse with singular values under 1e-5
    dropped, in X's dtype: the solver DistillKit's fit uses (float32 unless the values are float64)."""
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    inv = torch.where(S > 1e-5, 1 / S, torch.zeros_like(S))
    return (Vh.transpose(-1, -2) @ (inv[:, None] * (U.transpose(-1, -2) @ Y.T))).T


def encode_logprobs(values: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    """(n, k) log-probs sorted largest first -> (n, logprob_bytes) uint8, following DistillKit's
    ``compress_monotonic_logprobs`` step by step (delta encoding, exact part, SVD least-squares fit, naive or
    error-diffused residual quantisation): the spec the decoder reads, used by the tests and the measurements."""
    lp = torch.from_numpy(np.asarray(values, dtype=np.float32))
    if cfg.delta_encoding:
        work = lp.double() if cfg.error_diffusion else lp
        deltas = torch.cat([lp[:, :1].to(work.dtype), work[:, 1:] - work[:, :-1]], dim=-1)
        if cfg.error_diffusion:  # each float32 rounding error is carried into the next delta
            out, err = torch.zeros_like(lp), torch.zeros_like(deltas[:, 0])
            for i in range(deltas.shape[1]):
                cur = deltas[:, i] + err
                out[:, i] = cur.to(lp.dtype)
                err = cur - out[:, i].double()
            lp = out
        else:
            lp = deltas.to(lp.dtype)
    chunks = []
    if cfg.exact_k:
        chunks.append(lp[:, : cfg.exact_k].to(DTYPES[cfg.exact_dtype]).contiguous().view(torch.uint8))
    approx = lp[:, cfg.exact_k : cfg.k]
    if cfg.polynomial_terms:
        X = term_matrix(cfg, approx.shape[1], torch.float32)  # the fit runs in float32, as DistillKit's
        coeffs = least_squares(X, approx).to(DTYPES[cfg.term_dtype])
        fit = torch.sum(X.to(coeffs.dtype) * coeffs.unsqueeze(-2), dim=-1).to(torch.float32)
        residual = approx - fit
        chunks.append(coeffs.contiguous().view(torch.uint8))
    else:
        residual = approx
    at, err = 0, None
    for qb in cfg.residual_bins:
        r = residual[:, at : at + qb.num_elements]
        top = 1.0 if qb.element_bits == 1 else 2.0 ** (qb.element_bits - 1)
        amax = r.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / top).to(DTYPES[qb.scale_dtype]).to(r.dtype)
        lo, hi = (0, 1) if qb.element_bits == 1 else (-(2 ** (qb.element_bits - 1)), 2 ** (qb.element_bits - 1) - 1)
        scaled = r / scale
        if cfg.error_diffusion:  # the rounding error of each element goes into the next (across bins too)
            q = torch.zeros_like(scaled, dtype=torch.long)
            err = torch.zeros_like(scaled[:, 0]) if err is None else err
            for i in range(scaled.shape[1]):
                cur = scaled[:, i] + err
                qi = torch.round(cur).clamp(lo, hi)
                err = cur - qi
                q[:, i] = (qi - lo).long()
        else:
            q = (torch.round(scaled).clamp(lo, hi) - lo).long()
        chunks.append(scale.to(DTYPES[qb.scale_dtype]).contiguous().view(torch.uint8))
        chunks.append(torch.from_numpy(pack_bits(q.numpy(), qb.element_bits)))
        at += qb.num_elements
    return torch.cat(chunks, dim=-1).numpy() if chunks else np.zeros((len(values), 0), np.uint8)


def encode_ids(ids: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    return pack_bits(ids, cfg.index_bits)


def decode_ids(b: np.ndarray, cfg: CompressionConfig) -> np.ndarray:
    if b.shape[1] != cfg.index_bytes():
        raise CacheError(
            f"bytepacked_indices has {b.shape[1]} bytes per position, the config gives "
            f"{cfg.index_bytes()} ({cfg.k} ids of {cfg.index_bits} bits)"
        )
    return unpack_bits(b, cfg.index_bits, cfg.k)


# -- import ---------------------------------------------------------------------------------------------------------
def load_config(src: Path, config: str | Path | None) -> CompressionConfig:
    import yaml

    path = Path(config) if config is not None else (src / CONFIG_NAME if src.is_dir() else src.parent / CONFIG_NAME)
    if not path.is_file():
        raise UsageError(
            f"no DistillKit compression config at {path}: the capture writes {CONFIG_NAME} beside its "
            "Parquet files; pass its path (the capture cannot be decoded without it)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path} is not valid YAML ({e.__class__.__name__})") from None
    return CompressionConfig.from_dict(raw, str(path))


def capture_files(src: Path) -> list[Path]:
    if not src.exists():
        raise UsageError(
            f"{src} does not exist; give a DistillKit capture directory (data_*.parquet + "
            f"{CONFIG_NAME}) or one of its Parquet files"
        )
    files = sorted(src.glob("*.parquet")) if src.is_dir() else [src]
    if not files:
        raise UsageError(f"{src} holds no .parquet file")
    return files


def check_capture_columns(names: list[str], where: Path) -> None:
    if "packed_indices" in names and "coeffs" in names:
        raise UsageError(
            f"{where} is in DistillKit's legacy format (mean-centred logits, their normaliser not "
            "stored): it cannot be turned into log-probs exactly; re-capture with the current format"
        )
    if "token_ids" in names and "top_values" in names:
        raise UsageError(
            f"{where} holds raw token_ids/top_values rows, whose values may be logits or log-probs "
            "(the rows do not say); this importer reads DistillKit's compressed captures"
        )
    missing = [c for c in ("input_ids", "compressed_logprobs", "bytepacked_indices") if c not in names]
    if missing:
        raise UsageError(f"{where} lacks the column {missing[0]!r}: not a DistillKit compressed capture")


def segments(n: int, attention: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) document spans of a row of ``n`` tokens (packed rows number their documents 1, 2, ... in
    ``attention_mask``; 0 is padding)."""
    a = attention[:n]
    cuts = np.flatnonzero(np.diff(a) != 0) + 1
    bounds = [0, *cuts.tolist(), len(a)]
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if a[s] != 0]


def capture_rows(files: list[Path], batch_rows: int) -> Iterator[tuple]:
    """(token ids, compressed log-prob bytes (positions, B), index bytes (positions, Bi), attention_mask or None)
    per Parquet row."""
    pa, pq = pyarrow_modules()
    for f in files:
        pf = pq.ParquetFile(str(f))
        names = pf.schema_arrow.names
        check_capture_columns(names, f)
        cols = ["input_ids", "compressed_logprobs", "bytepacked_indices"] + (
            ["attention_mask"] if "attention_mask" in names else []
        )
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            ids_col, lp_col, ix_col = (batch.column(c) for c in cols[:3])
            am_col = batch.column("attention_mask") if "attention_mask" in cols else None
            for r in range(batch.num_rows):
                ids = np.asarray(ids_col[r].values.to_numpy(zero_copy_only=False), dtype=np.int64)
                lp = lp_col[r].values
                ix = ix_col[r].values
                lpb = np.asarray(lp.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
                ixb = np.asarray(ix.flatten().to_numpy(zero_copy_only=False), dtype=np.uint8)
                n_pos = len(lp)
                lpb = lpb.reshape(n_pos, -1) if n_pos else lpb.reshape(0, 0)
                ixb = ixb.reshape(len(ix), -1) if len(ix) else ixb.reshape(0, 0)
                am = None if am_col is None else np.asarray(am_col[r].values.to_numpy(zero_copy_only=False))
                yield ids, lpb, ixb, am


def documents(
    files: list[Path], batch_rows: int, stats: dict, progress: Advance | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(ids, log-prob bytes, index bytes) of each document: position ``t`` predicts token ``t + 1`` of its
    document; a position whose next token is not in the row (a packed document's last: the packing cut it) is
    dropped and counted in ``stats['dropped']``. Packed rows are split into their documents (``attention_mask``
    numbers them), so no document attends to another in kdcli either."""
    for ids, lpb, ixb, am in capture_rows(files, batch_rows):
        if len(lpb) != len(ixb):
            raise CacheError("compressed_logprobs and bytepacked_indices have different numbers of positions")
        n_pos = len(lpb)
        for a, b in segments(len(ids), am) if am is not None else [(0, len(ids))]:
            stop = min(b - 1, n_pos)  # positions a..stop-1 predict tokens a+1..stop, all inside [a, b)
            keep = stop - a
            stats["dropped"] += max(0, min(b, n_pos) - a) - max(keep, 0)
            if keep >= 1:
                yield ids[a : stop + 1], lpb[a:stop], ixb[a:stop]
        stats["dropped"] += max(0, n_pos - len(ids))
        if progress is not None:
            progress.advance(1)


def document_batch(
    docs: list, row0: int, row_hash: np.ndarray, cfg: CompressionConfig, *, K: int, stats: dict, id_dtype: np.dtype
) -> dict[str, np.ndarray]:
    """Decoded documents -> the arrays of a kdcli topk token cache (K = exact_k or k)."""
    lpb = np.concatenate([d[1] for d in docs])
    ixb = np.concatenate([d[2] for d in docs])
    nxt = np.concatenate([d[0][1:] for d in docs]).astype(np.int64)  # the token each position predicts
    lp = decode_logprobs(lpb, cfg).double().numpy()[:, :K]  # (tokens, K), the first K ranks
    ids = decode_ids(ixb, cfg)[:, :K]
    if not np.isfinite(lp).all():
        i = int(np.flatnonzero(~np.isfinite(lp).all(axis=1))[0])
        raise CacheError(
            f"position {i} of documents {row0}.. decodes to non-finite log-probs (the capture had fewer "
            f"than {K} log-probs there)"
        )
    order = np.argsort(-lp, axis=1, kind="stable")
    lp = np.take_along_axis(lp, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    lp = np.minimum(lp, 0.0)
    mass = np.exp(lp).sum(axis=1)
    if (mass > 1 + MASS_TOL).any():
        i = int(np.flatnonzero(mass > 1 + MASS_TOL)[0])
        if K == cfg.exact_k:
            raise CacheError(
                f"position {i} of documents {row0}..: the exact log-probs sum to {mass[i]:.4f} > 1; "
                "the capture is damaged or not log-probs"
            )
    over = mass > 1.0
    stats["renormalized"] += int(over.sum())
    lp = np.where(over[:, None], lp - np.log(np.where(over, mass, 1.0))[:, None], lp)
    with np.errstate(divide="ignore"):
        tail = np.log1p(-np.minimum(np.where(over, 1.0, mass), 1.0))  # -inf where no mass is left
    hit = ids == nxt[:, None]
    found = hit.any(axis=1)
    bound = np.minimum(tail, lp[:, -1])
    target = np.where(found, np.where(hit, lp, 0.0).sum(axis=1), bound)
    stats["target_exact"] += int(found.sum())
    stats["target_bound"] += int((~found).sum())
    stats["positions"] += len(lp)
    n = len(docs)
    return {
        "row_index": np.arange(row0, row0 + n, dtype=np.int64),
        "sample_index": np.arange(row0, row0 + n, dtype=np.int64),
        "row_hash": row_hash[row0 : row0 + n],
        "lengths": np.array([len(d[1]) for d in docs], dtype=np.int64),
        "topk_ids": ids.astype(id_dtype),
        "topk_logprobs": lp.astype(np.float16),
        "tail_logmass": tail.astype(np.float16),
        "target_logprobs": target.astype(np.float16),
    }


class DistillKitFormat(Format):
    name = FORMAT_NAME
    imports = True
    import_options = ("ranks", "compression_config")
    import_tokenizer = True
    import_passes = 2
    summary = "DistillKit's compressed top-k captures (import only; decoded bit-exactly)"

    def source_rows(self, src, opts):
        if opts.ranks is not None and opts.ranks not in RANKS:
            raise UsageError(
                f"--ranks {opts.ranks}: use 'exact' (the top exact_k, stored exactly) or 'all' (all k, the "
                "polynomial-approximated ones included)"
            )
        _, pq = pyarrow_modules()
        files = capture_files(src)
        load_config(src, opts.compression_config)
        rows = 0
        for f in files:
            try:
                pf = pq.ParquetFile(str(f))
            except (OSError, ValueError) as e:
                raise UsageError(f"{f} is not a readable Parquet file ({str(e).splitlines()[0][:120]})") from None
            check_capture_columns(pf.schema_arrow.names, f)
            rows += pf.metadata.num_rows
        return rows

    def import_into(self, src, work, *, final, tokenizer, opts, progress):
        """Decode a DistillKit compressed capture into a kdcli ``topk`` token cache (module docstring). ``--ranks``:
        ``exact`` (default) keeps the exactly stored top ``exact_k`` (k = exact_k, exact tail mass), ``all`` keeps
        all k with the approximate ones marked. ``--compression-config``: default ``compression_config.yaml``
        beside the capture."""
        ranks = opts.ranks or "exact"
        files = capture_files(src)
        cfg = load_config(src, opts.compression_config)
        if ranks == "exact" and cfg.exact_k < 1:
            raise UsageError(
                "this capture stores no exact log-prob (exact_k = 0): every value is a polynomial approximation; "
                "import it with --ranks all to accept approximate values"
            )
        from kdcli.lm.text import token_row_hashes

        V = cfg.d
        if tokenizer.size > V:
            raise UsageError(
                f"tokenizer {tokenizer.spec} has {tokenizer.size} tokens but the capture's vocabulary d is {V}"
            )
        K = cfg.exact_k if ranks == "exact" else cfg.k
        block_rows = 64
        stats = {"dropped": 0, "renormalized": 0, "target_exact": 0, "target_bound": 0, "positions": 0}

        # pass 1: documents' identity and sizes, and the pre-tokenized rows beside the cache
        hashes, n_tokens, longest = [], 0, 1
        tok_writer = TokenRowsWriter(work / TOKENS_FILE)
        try:
            for ids, _, _ in documents(files, block_rows, {"dropped": 0}, progress):
                if ids.size and (ids.max() >= V or ids.min() < 0):
                    raise CacheError(f"{src}: a token id {int(ids.max())} is outside the vocabulary of {V}")
                s = ids.astype(np.int32)
                hashes.append(token_row_hashes([s], np.array([1]))[0])
                tok_writer.add([s], [np.arange(len(s)) >= 1])
                n_tokens += len(ids)
                longest = max(longest, len(ids))
        finally:
            tok_writer.close()
        if not hashes:
            raise UsageError(f"{src} holds no position with a token to predict")
        row_hash = np.array(hashes, dtype=np.uint64)
        n_targets = n_tokens - len(row_hash)
        id_dtype = numpy_id_dtype(V)
        approximate = []
        if ranks == "all" and cfg.exact_k < cfg.k:
            approximate.append(
                f"ranks {cfg.exact_k + 1}..{cfg.k} of every position are DistillKit's polynomial approximation (terms "
                f"{list(cfg.polynomial_terms)}, {len(cfg.residual_bins)} residual bins), re-sorted; the tail mass is 1 "
                "minus their sum"
            )
        if cfg.exact_dtype != "float32":
            approximate.append(f"the exact ranks were stored in {cfg.exact_dtype} by the capture")
        unrecorded = list(UNRECORDED)
        config = {
            **cfg.__dict__,
            "residual_bins": [b.__dict__ for b in cfg.residual_bins],
            "polynomial_terms": list(cfg.polynomial_terms),
        }
        plan = imported_token_plan(
            fmt=self.name,
            source=str(src),
            mode_name="topk",
            k=K,
            vocab=V,
            tokenizer=tokenizer,
            teacher=unrecorded_teacher(self.name, str(src)),
            data=token_data_identity(self.name, str(src), str(final / TOKENS_FILE), n_tokens, row_hash, n_targets, V),
            num_rows=len(row_hash),
            longest=longest,
            notes={"compression_config": config, "ranks": ranks, "tokens": TOKENS_FILE},
            unrecorded=unrecorded,
            approximate=approximate,
        )

        def batches() -> Iterator[dict[str, np.ndarray]]:
            row, buf = 0, []
            for doc in documents(files, block_rows, stats, progress):
                buf.append(doc)
                if len(buf) == block_rows:
                    yield document_batch(buf, row, row_hash, cfg, K=K, stats=stats, id_dtype=id_dtype)
                    row, buf = row + len(buf), []
            if buf:
                yield document_batch(buf, row, row_hash, cfg, K=K, stats=stats, id_dtype=id_dtype)

        final_m = write_cache(work, plan, batches())
        if stats["target_bound"]:
            approximate.append(
                f"target_logprobs at {stats['target_bound']:,} of {n_targets:,} positions whose next token is not "
                f"among the {K} ids: min(log tail, the smallest log-prob), an upper bound"
            )
        if stats["renormalized"]:
            approximate.append(
                f"{stats['renormalized']:,} positions whose decoded mass exceeded 1 were renormalised (empty tail)"
            )
        final_m["imported"].update(approximate=approximate, positions=dict(stats))
        write_manifest(work, final_m)
        notes = []
        if stats["dropped"]:
            notes.append(f"{stats['dropped']:,} positions predict a token the capture or the packing cut off: dropped")
        return Imported(
            manifest=final_m,
            tokens=n_targets,
            tokens_file=True,
            unrecorded=unrecorded,
            approximate=approximate,
            notes=notes,
        )


FORMAT_OBJECT = DistillKitFormat()
