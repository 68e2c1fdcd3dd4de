"""A reference cache for the DPO-family trainers (docs/methods/dpo.md, docs/distributed.md): the reference model's
log-probs of a dataset, computed once into a folder and reused by later runs and by every rank.

    args = PackedDPOConfig(..., reference_cache_dir="ref-cache")    # implies precompute_ref_log_probs=True

Each entry is a folder ``<reference_cache_dir>/ref-<digest>`` named by a hash of its key, the things the stored values
depend on: the reference model (class, ``name_or_path`` and a hash of the weights the reference forward uses: the
`ref_model`'s, or the PEFT base model's without the trained adapter), the tokenizer (name, vocabulary, special tokens
and chat template), the data (a hash of the tokenised rows), ``max_length``, ``truncation_mode``, the precision, and
what the trainer stores (summed log-probs, RRPO's per-token ones, D²O's anchors). Padding-free packing is not part of
the key: packed and padded forwards give the same values within floating-point rounding. A folder holds ``key.json``, ``logps/`` (the reference
columns, one row per data row, in order) and ``done.json`` (row count and a hash of the stored columns); it is written
under a temporary name and renamed, so it exists only complete. A folder whose stored hash, row count or key does not
match is reported and computed again; a key with no entry is computed, and the nearest existing entry's differing key
components are logged, so a changed setting is never silently served old values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from datasets import Dataset, load_from_disk

from prefalign.files import replace_path, settings_mismatch, temporary_path, write_json

logger = logging.getLogger("prefalign.trainers.reference_cache")

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
_HASH_ROWS = 4096  # rows per hashed block of a dataset


@dataclass
class ReferenceCacheArguments:
    r"""The reference-cache field, mixed into the DPO-family configs (docs/methods/dpo.md).

    Parameters that control the reference:
        reference_cache_dir (`str` or `None`, defaults to `None`): a folder where the reference log-probs of each
            dataset are stored once, keyed by reference model, tokenizer, data, `max_length` and `truncation_mode`,
            and reused by later runs and by every process. Implies `precompute_ref_log_probs=True`. Refused where the
            loss needs the reference at every step (RRPO with alpha > 0, disentangled "token_mask",
            `sync_ref_model`): those keep the live reference.
    """

    reference_cache_dir: str | None = field(
        default=None, metadata={"help": "Folder of reusable reference log-probs (implies precompute_ref_log_probs)."})

    def __post_init__(self):
        if self.reference_cache_dir is not None:
            reason = self.live_reference_reason()
            if reason is not None:
                raise ValueError(f"reference_cache_dir={self.reference_cache_dir!r} cannot be used: {reason}, so "
                                 "this setting keeps the live reference; unset reference_cache_dir")
            self.precompute_ref_log_probs = True
        super().__post_init__()

    def live_reference_reason(self) -> str | None:
        """Why this configuration's loss needs the live reference at every step (None: the cache can serve it)."""
        if getattr(self, "sync_ref_model", False):
            return "sync_ref_model=True updates the reference during training"
        return None


def weights_hash(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes, exact bytes), leaving out those whose
    name contains any of ``skip``; DeepSpeed ZeRO-3 parameters and FSDP2 DTensors are gathered one at a time
    (collective: every rank calls this)."""
    module = getattr(module, "module", module)  # a DeepSpeed engine or DDP wrapper
    h = hashlib.sha256()
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name in sorted(tensors):
        if any(s in name for s in skip):
            continue
        tensor = tensors[name]
        if hasattr(tensor, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([tensor]):
                data = tensor.detach().cpu().contiguous()
        elif hasattr(tensor, "full_tensor"):  # an FSDP2 DTensor shard
            data = tensor.detach().full_tensor().cpu().contiguous()
        else:
            data = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        h.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_hash(processing_class) -> str:
    """SHA-256 of a tokenizer's class, vocabulary, special tokens and chat template."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    parts = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
             sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items()),
             getattr(processing_class, "chat_template", None) or getattr(tokenizer, "chat_template", None)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def dataset_hash(dataset: Dataset, exclude: tuple[str, ...] = REFERENCE_COLUMNS) -> str:
    """SHA-256 of a dataset's rows (every column but ``exclude``, in order), read in Arrow blocks."""
    columns = sorted(c for c in dataset.column_names if c not in exclude)
    arrow = dataset.select_columns(columns).with_format("arrow")
    h = hashlib.sha256(json.dumps(columns).encode())
    for start in range(0, len(dataset), _HASH_ROWS):
        table = arrow[start:start + _HASH_ROWS].replace_schema_metadata(None)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue())
    return h.hexdigest()


def entry_path(cache_dir: str | Path, key: dict[str, Any]) -> Path:
    """The entry folder of ``key``: ``<cache_dir>/ref-<first 16 hex digits of the key's hash>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return Path(cache_dir) / f"ref-{digest[:16]}"


def check_entry(path: Path, key: dict[str, Any], num_rows: int) -> str | None:
    """Why the entry at ``path`` cannot be reused for ``key`` and ``num_rows`` rows (None: it can)."""
    try:
        done = json.loads((path / "done.json").read_text(encoding="utf-8"))
        stored_key = json.loads((path / "key.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"its key.json or done.json is missing or unreadable ({error})"
    changed = settings_mismatch(stored_key, key, keys=sorted(set(key) | set(stored_key)))
    if changed:
        return f"its stored key differs ({changed})"
    if done.get("num_rows") != num_rows:
        return f"it holds {done.get('num_rows')} rows, the data has {num_rows}"
    try:
        stored = load_from_disk(str(path / "logps"))
        if len(stored) != num_rows or set(stored.column_names) != set(done.get("columns", ())):
            return f"logps/ holds {len(stored)} rows with columns {stored.column_names}, not what done.json says"
        if dataset_hash(stored, exclude=()) != done.get("sha256"):
            return "the stored values do not match the hash in done.json"
    except Exception as error:  # any unreadable Arrow file or folder
        return f"logps/ cannot be read ({type(error).__name__}: {error})"
    return None


def nearest_entry_change(cache_dir: str | Path, key: dict[str, Any]) -> tuple[Path, str] | None:
    """The existing entry whose key differs from ``key`` in the fewest components, and those components."""
    best = None
    for key_file in sorted(Path(cache_dir).glob("ref-*/key.json")):
        try:
            stored = json.loads(key_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        changed = [k for k in sorted(set(key) | set(stored)) if stored.get(k) != key.get(k)]
        if changed and (best is None or len(changed) < len(best[2])):
            best = (key_file.parent, stored, changed)
    if best is None:
        return None
    return best[0], settings_mismatch(best[1], key, keys=best[2])


def write_entry(path: Path, key: dict[str, Any], columns: Dataset) -> None:
    """Write an entry folder atomically: built under a temporary name beside ``path``, then renamed over it."""
    tmp = temporary_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        columns.save_to_disk(str(tmp / "logps"))
        write_json(tmp / "key.json", key)
        write_json(tmp / "done.json", {"num_rows": len(columns), "columns": columns.column_names,
                                       "sha256": dataset_hash(columns, exclude=())})
        replace_path(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
