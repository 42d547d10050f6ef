"""Training data: formats, readers, the shared token cache, packing and deterministic DP-sharded batches.

    formats.py     record shapes (messages, sharegpt, alpaca, prompt/completion, text) -> chat messages or text
    readers.py     .jsonl, .json arrays, .parquet, datasets folders / .arrow -> (file:line, record), by rank share
    samples.py     one record -> token ids and shifted labels (response-only loss, truncation)
    cache.py       the token cache: tokenized once (split over ranks), memory-mapped by every rank, verified
    packing.py     rows of one or several packed samples, in memory or over the cache
    batches.py     the epoch order, each step's rows per DP rank, collation
    train_data.py  build_train_data: the one call a trainer makes
"""
from .batches import StepBatches, collate, epoch_order, epoch_permutation
from .cache import TokenCache, open_cache
from .formats import FORMATS, to_record
from .packing import CachedRows, Row, pack, row_starts
from .readers import read_records
from .samples import DatasetStats, Sample, build_sample, load_samples, sample_arrays, shift_labels, truncate
from .train_data import TrainData, build_train_data

__all__ = ["StepBatches", "collate", "epoch_order", "epoch_permutation", "TokenCache", "open_cache", "FORMATS",
           "to_record", "CachedRows", "Row", "pack", "row_starts", "read_records", "DatasetStats", "Sample",
           "build_sample", "load_samples", "sample_arrays", "shift_labels", "truncate", "TrainData",
           "build_train_data"]
