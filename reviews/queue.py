"""The review queue: every needs_review row of a predict OUT (and the --audit sample), as tabs, groups and pages.

Opening the queue of a 1 M-row run takes seconds in bounded memory: each shard is read once with only
the columns the index needs, and per queued row only a small index stays, in numpy arrays (shard, row
in the shard, tab, group, doubt, a 64-bit hash of the row's key: 25 bytes a row). A page's rows are
read from their shards when the page is shown (only the tile columns; the last few shards are cached).

Order: tabs are the review reasons (then the audit). Inside a tab rows are grouped (the predicted
character; the top-2 pair for low_confidence; the error kind for errors), the largest group first so a
confusion group is settled in one go; inside a group the most doubtful first (lowest confidence,
highest out-of-set score).

A running run keeps committing shards: the queue lists predictions/ again at most every REFRESH_S and
indexes only new shards. A known shard that changed (rewritten by --resume --retry-errors) or went
(--overwrite) makes it rebuild the whole index. The audit sample is drawn from the shards present when
the index was built.

Rows are named to the browser by the hex of their key's hash (`row_id`): never by a path.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kmnist_core import predictions
from kmnist_core.card import ModelCard
from kmnist_core.review_reasons import REVIEW_REASONS
from kmnist_core.storage import Location
from reviews import audit

AUDIT = "audit"
TABS = (*REVIEW_REASONS, AUDIT)
INDEX_COLUMNS = ["path_bytes", "needs_review", "review_reason", "pred_char", "pred_index", "confidence",
                 "ood_score", "topk_chars", "error_kind"]
TILE_COLUMNS = ["path", "path_bytes", "rel_path", "review_reason", "pred_char", "confidence", "topk_chars",
                "topk_confidences", "ood_score", "error", "error_kind", "ink_x", "ink_y", "ink_w", "ink_h",
                "width", "height", "model_id", "run_id"]
PAGE_SIZE = 30
MAX_PAGE_SIZE = 200
REFRESH_S = 5.0
CACHED_SHARDS = 16
ROW_ID = re.compile(r"[0-9a-f]{16}")


def key_hashes(keys: Iterable[bytes]) -> np.ndarray:
    """A 64-bit hash of each row key: 8 bytes a row instead of the key (a path) itself."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k, digest_size=8).digest(), "little") for k in keys), np.uint64)


def row_id(key_hash: int) -> str:
    return f"{int(key_hash):016x}"


def parse_row_id(text: str) -> int | None:
    return int(text, 16) if ROW_ID.fullmatch(text) else None


def open_run(out: Location) -> ModelCard:
    """The model card of the predict run in OUT; anything else is refused with one line."""
    return predictions.open_predictions(out, need_card=True).card


def shard_stamps(folder: Location) -> dict[str, tuple[int, int]]:
    """Each committed shard's (size, mtime): a shard rewritten in place gets a new stamp."""
    if folder.local:
        try:
            with os.scandir(folder.path) as entries:
                return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in entries
                        if e.name.endswith(".parquet") and not e.name.startswith(".") and e.is_file()}
        except FileNotFoundError:
            return {}
    infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    return {i.base_name: (i.size, i.mtime_ns or 0) for i in infos
            if i.type == pafs.FileType.File and i.base_name.endswith(".parquet") and not i.base_name.startswith(".")}


@dataclass
class Rows:
    """Queued rows as parallel arrays (the index)."""

    shard: np.ndarray  # int32: position in Queue.shards
    row: np.ndarray  # int32: row in the shard
    tab: np.ndarray  # int8: position in TABS
    group: np.ndarray  # int32: position in Queue.groups
    doubt: np.ndarray  # float32: lower = shown first within its group
    key: np.ndarray  # uint64: key_hashes of path_bytes

    @classmethod
    def empty(cls) -> Rows:
        return cls(*(np.zeros(0, t) for t in (np.int32, np.int32, np.int8, np.int32, np.float32, np.uint64)))

    @classmethod
    def concat(cls, parts: list[Rows]) -> Rows:
        parts = [cls.empty(), *parts]
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass
class Scanned:
    """What one shard adds: its queued rows (groups by name, mapped to ids by the queue) and, for the
    audit, its auto-accepted rows."""

    rows: Rows
    group_names: list[str]  # Rows.group indexes this list until the queue maps it
    accepted_row: np.ndarray
    accepted_class: np.ndarray
    accepted_confidence: np.ndarray


def read_columns(folder: Location, name: str, columns: list[str]) -> pa.Table:
    loc = folder.join(name)
    return pq.read_table(loc.path, filesystem=loc.fs, columns=columns)


def scan_shard(folder: Location, name: str) -> Scanned:
    t = read_columns(folder, name, INDEX_COLUMNS)
    needs = t["needs_review"].to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(needs).astype(np.int32)
    f = t.take(rows)
    reason = f["review_reason"]
    pair = pc.binary_join_element_wise(pc.list_element(f["topk_chars"], 0), pc.list_element(f["topk_chars"], 1), "/")
    group = pc.if_else(pc.equal(reason, "low_confidence"), pair,
                       pc.if_else(pc.equal(reason, "error"), f["error_kind"],
                                  pc.if_else(pc.equal(reason, "blank"), pa.scalar("blank"), f["pred_char"])))
    encoded = pc.fill_null(group, "?").combine_chunks().dictionary_encode()
    confidence = pc.fill_null(f["confidence"], 0.0).to_numpy()
    ood = pc.fill_null(f["ood_score"], 0.0).to_numpy()
    reason_text = np.asarray(reason.to_pylist(), dtype=object)
    doubt = np.where(reason_text == "low_confidence", confidence,
                     np.where(reason_text == "unknown_character", -ood, 0.0)).astype(np.float32)
    queued = Rows(np.zeros(len(rows), np.int32), rows,
                  pc.index_in(reason, value_set=pa.array(REVIEW_REASONS)).to_numpy(zero_copy_only=False).astype(np.int8),
                  encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), doubt,
                  key_hashes(f["path_bytes"].to_pylist()))
    accepted = np.flatnonzero(~needs & t["pred_index"].is_valid().to_numpy(zero_copy_only=False)).astype(np.int32)
    a = t.select(["pred_index", "confidence"]).take(accepted)
    return Scanned(queued, encoded.dictionary.to_pylist(), accepted, a["pred_index"].to_numpy().astype(np.int16),
                   a["confidence"].to_numpy().astype(np.float32))


@dataclass
class Tab:
    """One tab's order: positions into the index, groups contiguous (largest first)."""

    order: np.ndarray
    groups: np.ndarray  # group ids in the order shown
    starts: np.ndarray  # where each group starts in `order`


class StaleIndex(Exception):
    """A shard no longer holds the row the index points at (it was rewritten since the index was built)."""


class Queue:
    """The index of queued rows of OUT and the pages over it; safe to use from several threads."""

    def __init__(self, out: Location, classes: tuple[str, ...], audit_size: int = 0, seed: int = 0):
        self.out, self.classes, self.audit_size, self.seed = out, classes, audit_size, seed
        self.folder = predictions.predictions_dir(out)
        self.lock = threading.RLock()
        self.cache: OrderedDict[str, pa.Table] = OrderedDict()
        self.build(shard_stamps(self.folder))

    # -- building the index ---------------------------------------------------------------------------

    def build(self, stamps: dict[str, tuple[int, int]]) -> None:
        with self.lock:
            self.shards: list[str] = []
            self.stamps: dict[str, tuple[int, int]] = {}
            self.groups: list[str] = []
            self.group_ids: dict[str, int] = {}
            self.rows = Rows.empty()
            self.cache.clear()
            accepted = self.add_shards(stamps)
            if self.audit_size:
                self.rows = Rows.concat([self.rows, self.audit_sample(*accepted)])
            self.settled = np.zeros(len(self.rows.key), bool)
            self.reindex()
            self.listed_at = time.monotonic()

    def add_shards(self, stamps: dict[str, tuple[int, int]]) -> tuple[np.ndarray, ...]:
        """Index the shards named in `stamps` (in name order); returns their auto-accepted rows as
        (shard, row, class, confidence) for the audit."""
        names = sorted(stamps)
        with ThreadPoolExecutor(2 if self.out.local else 8) as pool:  # pyarrow reads without the GIL
            scans = list(pool.map(lambda n: scan_shard(self.folder, n), names))
        parts, accepted = [], []
        for name, scan in zip(names, scans):
            shard = len(self.shards)
            self.shards.append(name)
            self.stamps[name] = stamps[name]
            scan.rows.shard[:] = shard
            to_queue_ids = np.array([self.group_id(g) for g in scan.group_names], np.int32)
            if len(to_queue_ids):
                scan.rows.group = to_queue_ids[scan.rows.group]
            parts.append(scan.rows)
            accepted.append((np.full(len(scan.accepted_row), shard, np.int32), scan.accepted_row,
                             scan.accepted_class, scan.accepted_confidence))
        self.rows = Rows.concat([self.rows, *parts])
        return tuple(np.concatenate([a[i] for a in accepted]) if accepted else np.zeros(0) for i in range(4))

    def group_id(self, name: str) -> int:
        if name not in self.group_ids:
            self.group_ids[name] = len(self.groups)
            self.groups.append(name)
        return self.group_ids[name]

    def audit_sample(self, shard: np.ndarray, row: np.ndarray, cls: np.ndarray, confidence: np.ndarray) -> Rows:
        chosen = audit.draw(cls, confidence, self.audit_size, self.seed)
        shard, row = shard[chosen], row[chosen]
        keys = np.zeros(len(chosen), np.uint64)
        for s in np.unique(shard):  # only the sampled rows' keys are read
            here = np.flatnonzero(shard == s)
            paths = read_columns(self.folder, self.shards[s], ["path_bytes"])["path_bytes"].take(row[here])
            keys[here] = key_hashes(paths.to_pylist())
        groups = np.array([self.group_id(self.classes[c]) for c in cls[chosen]], np.int32)
        return Rows(shard.astype(np.int32), row.astype(np.int32), np.full(len(chosen), TABS.index(AUDIT), np.int8),
                    groups, confidence[chosen].astype(np.float32), keys)

    def reindex(self) -> None:
        """Tab orders and the key lookup, after the rows changed."""
        r = self.rows
        self.tabs: dict[str, Tab] = {}
        for t, name in enumerate(TABS):
            pos = np.flatnonzero(r.tab == t)
            ids, inverse, sizes = np.unique(r.group[pos], return_inverse=True, return_counts=True)
            shown = np.lexsort((np.array([self.groups[i] for i in ids], dtype=object).astype(str), -sizes)) \
                if len(ids) else np.zeros(0, np.int64)
            rank = np.empty(len(ids), np.int64)
            rank[shown] = np.arange(len(ids))
            order = pos[np.lexsort((r.row[pos], r.shard[pos], r.doubt[pos], rank[inverse]))]
            self.tabs[name] = Tab(order, ids[shown], np.concatenate([[0], np.cumsum(sizes[shown])[:-1]]).astype(np.int64)
                                  if len(ids) else np.zeros(0, np.int64))
        self.by_key = np.argsort(r.key)
        self.sorted_keys = r.key[self.by_key]

    def refresh(self, force: bool = False) -> bool:
        """List predictions/ again (at most every REFRESH_S unless forced); True if the index changed,
        after which every settled flag must be set again (mark)."""
        with self.lock:
            if not force and time.monotonic() - self.listed_at < REFRESH_S:
                return False
            stamps = shard_stamps(self.folder)
            self.listed_at = time.monotonic()
            if any(stamps.get(name) != stamp for name, stamp in self.stamps.items()):
                self.build(stamps)
                return True
            new = {n: s for n, s in stamps.items() if n not in self.stamps}
            if not new:
                return False
            self.add_shards(new)
            self.settled = np.concatenate([self.settled, np.zeros(len(self.rows.key) - len(self.settled), bool)])
            self.reindex()
            return True

    # -- settled rows -----------------------------------------------------------------------------------

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Index position of each key hash, -1 where the key is not queued."""
        keys = np.asarray(keys, np.uint64)
        at = np.searchsorted(self.sorted_keys, keys)
        found = at < len(self.sorted_keys)
        found[found] = self.sorted_keys[at[found]] == keys[found]
        return np.where(found, self.by_key[np.minimum(at, len(self.by_key) - 1)] if len(self.by_key) else -1, -1)

    def mark(self, keys: np.ndarray, settled: np.ndarray) -> None:
        """Set whether each key (hash) has a standing decision."""
        with self.lock:
            pos = self.positions(keys)
            self.settled[pos[pos >= 0]] = np.asarray(settled, bool)[pos >= 0]

    def reset_marks(self, keys: np.ndarray) -> None:
        """Exactly `keys` are settled (after a rebuild, from every standing decision)."""
        with self.lock:
            self.settled[:] = False
            self.mark(keys, np.ones(len(keys), bool))

    # -- pages ----------------------------------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Per tab: rows and rows left (without a standing decision)."""
        with self.lock:
            return {name: {"total": len(tab.order), "left": int((~self.settled[tab.order]).sum())}
                    for name, tab in self.tabs.items()}

    def page(self, tab_name: str, page: int, size: int = PAGE_SIZE) -> dict:
        """One page of a tab: the tiles (read from their shards) and where the tab and its groups stand."""
        if tab_name not in self.tabs:
            raise KeyError(tab_name)
        size = max(1, min(size, MAX_PAGE_SIZE))
        with self.lock:
            tab = self.tabs[tab_name]
            open_ = ~self.settled[tab.order]
            pages = max(1, -(-len(tab.order) // size))
            page = max(0, min(page, pages - 1))
            positions = tab.order[page * size:(page + 1) * size]
            left = np.add.reduceat(open_.astype(np.int64), tab.starts) if len(tab.starts) else np.zeros(0, np.int64)
            ends = np.append(tab.starts[1:], len(tab.order))
            groups = [{"name": self.groups[g], "total": int(e - s), "left": int(n), "first_page": int(s // size)}
                      for g, s, e, n in zip(tab.groups, tab.starts, ends, left)]
            first_open = int(np.argmax(open_)) // size if open_.any() else None
            tiles = self.tiles(positions)
        return {"tab": tab_name, "page": page, "pages": pages, "size": size, "total": len(tab.order),
                "left": int(open_.sum()), "first_open_page": first_open, "groups": groups, "tiles": tiles}

    def tiles(self, positions: np.ndarray) -> list[dict]:
        """The tile columns of the rows at `positions`, in that order, each with its id and group."""
        with self.lock:
            r = self.rows
            found: dict[int, dict] = {}
            for s in np.unique(r.shard[positions]):
                here = positions[r.shard[positions] == s]
                table = self.shard_table(self.shards[s])
                if r.row[here].max() >= table.num_rows:  # a rewritten shard may hold fewer rows
                    raise StaleIndex(self.shards[s])
                rows = table.take(r.row[here]).to_pylist()
                for p, row in zip(here, rows):
                    if key_hashes([row["path_bytes"]])[0] != r.key[p]:
                        raise StaleIndex(self.shards[s])
                    found[int(p)] = {**row, "id": row_id(r.key[p]), "group": self.groups[r.group[p]],
                                     "tab": TABS[r.tab[p]]}
            return [found[int(p)] for p in positions]

    def rows_by_id(self, ids: list[str]) -> list[dict | None]:
        """Tile rows for row ids (None for an id that is not queued)."""
        keys = [parse_row_id(i) for i in ids]
        with self.lock:
            pos = self.positions(np.array([k if k is not None else 0 for k in keys], np.uint64))
            pos[[k is None for k in keys]] = -1
            rows = self.tiles(pos[pos >= 0])
        it = iter(rows)
        return [next(it) if p >= 0 else None for p in pos]

    def shard_table(self, name: str) -> pa.Table:
        if name in self.cache:
            self.cache.move_to_end(name)
            return self.cache[name]
        table = read_columns(self.folder, name, TILE_COLUMNS)
        self.cache[name] = table
        if len(self.cache) > CACHED_SHARDS:
            self.cache.popitem(last=False)
        return table
