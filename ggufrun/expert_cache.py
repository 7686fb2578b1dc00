"""Expert placement: hot routed experts resident in a byte-budgeted arena, cold ones read on demand.

Python decides, C computes. The native MoE call (`gr_moe_ffn`) takes one pointer per expert per weight;
this module only decides what those pointers point at:

  tier "ram"    -- a copy in the arena: one anonymous mapping sized to the budget (optionally mlock'ed),
                   cut into equal slots, one expert (gate, up, down) per slot;
  tier "mapped" -- the expert's slice of the memory-mapped file (what ExpertStore hands out without a
                   cache); used only when a batch needs more distinct experts than the arena has slots.

Misses are read with pread into the arena, by default with O_DIRECT, so a miss neither fills the page
cache nor goes through readahead: under a memory cgroup (where page cache counts against the limit)
the process stays at arena + always-active weights + runtime. The expert tensors' mappings get
MADV_RANDOM so the mapped tier does not read ahead either; always-active weights get MADV_WILLNEED.

Eviction (LRFU): every (layer, expert) has a score, its use count decayed exponentially with a
half-life of `half_life` tokens; a miss evicts the resident expert with the lowest score. A long
half-life is frequency (LFU), a short one recency (LRU). Saved statistics (`save_stats`/`load_stats`)
seed the scores with each expert's long-run rate and pre-fill the arena with the most used experts.

Prefetch: when layer L's experts are resolved, layer L+1's router (with L+1's norm weight) is applied to
L's normalised hidden state; the predicted experts that are not resident are read by a pool of I/O
threads while layer L's experts and layer L+1's attention compute (both release the GIL), so a miss
costs latency only when the prediction was wrong.

A GPU tier would be a third placement of the same kind (see ARCHITECTURE.md, "Expert placement"); it
is not implemented.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from . import native
from .gguf_file import GGUFFile

_ffi = native._ffi
PAGE = mmap.PAGESIZE
DIRECT_ALIGN = 4096          # O_DIRECT needs offset, length and buffer aligned to the logical block
DEFAULT_HALF_LIFE = 256      # tokens; between recency (short) and frequency (long)
DEFAULT_RESERVE = 128 << 20  # the interpreter, numpy, cffi, the tokenizer and scratch: ~100 MiB measured
STATS_FORMAT = "ggufrun-expert-stats"

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'800M', '1.5G', '512MiB', '2GB', '1048576' -> bytes. K/M/G/T and KiB/MiB/GiB/TiB are powers of
    1024; KB/MB/GB/TB are powers of 1000; a bare number is bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(3) and not m.group(2)) or (m.group(3).lower() == "i"):
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 800M, 1.5G,"
                         f" 512MiB or 2GB (K/M/G/T and KiB..TiB are powers of 1024, KB..TB powers of 1000)")
    n, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
    power = " kmgt".index(unit) if unit else 0
    base = 1000 if suffix == "b" else 1024
    return int(n * base ** power)


def _round_up(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# -- the plan: what goes where, computed from the file alone ---------------------------------------------

@dataclass
class Plan:
    file_bytes: int
    always_active_bytes: int     # attention, dense and shared FFNs, norms, routers, output, embeddings
    routed_bytes: int
    n_experts: int               # routed experts over all layers
    expert_bytes: int            # the largest expert (gate + up + down), what one slot must hold
    slot_bytes: int              # an expert with O_DIRECT alignment slack
    kv_bytes: int
    reserve_bytes: int
    mem_budget: int | None
    cache_bytes: int             # the arena
    n_slots: int

    @property
    def resident_fraction(self) -> float:
        return min(self.n_slots / self.n_experts, 1.0) if self.n_experts else 0.0

    def lines(self) -> list[str]:
        from .progress import human_bytes as hb
        out = []
        if self.mem_budget is not None:
            out.append(f"memory budget          {hb(self.mem_budget)}")
        out += [f"  1. always-active      {hb(self.always_active_bytes)}  (mapped, WILLNEED: attention, dense/shared"
                f" FFNs, routers, embeddings, output)",
                f"  2. KV cache           {hb(self.kv_bytes)}",
                f"  3. runtime reserve    {hb(self.reserve_bytes)}",
                f"  4. expert cache       {hb(self.cache_bytes)}: {self.n_slots} slots of {hb(self.slot_bytes)}"
                f" = {self.resident_fraction:.0%} of {self.n_experts} routed experts ({hb(self.routed_bytes)})",
                f"  5. cold experts       read on demand from the file (pread, O_DIRECT), prefetched one layer ahead"]
        return out


def _expert_tensors(f: GGUFFile) -> list[tuple[str, str, str]]:
    out = []
    for name in f.tensor_infos:
        if name.endswith(".ffn_gate_exps.weight"):
            pre = name[: -len("ffn_gate_exps.weight")]
            parts = (name, pre + "ffn_up_exps.weight", pre + "ffn_down_exps.weight")
            if all(p in f.tensor_infos for p in parts):
                out.append(parts)
    return out


def _slot_layout(sizes: list[tuple[int, int, int]]) -> tuple[int, tuple[int, int, int]]:
    """One slot holds an expert's three parts, each in a region big enough for an O_DIRECT read of the
    part at any alignment: (slot bytes, region offset of each part)."""
    regions = [max(s[p] for s in sizes) for p in range(3)]
    regions = [_round_up(r, DIRECT_ALIGN) + DIRECT_ALIGN for r in regions]
    offs = (0, regions[0], regions[0] + regions[1])
    return sum(regions), offs


def plan(f: GGUFFile, *, mem_budget: int | None = None, expert_cache: int | None = None, n_ctx: int = 4096,
         kv_bytes: int | None = None, reserve: int = DEFAULT_RESERVE) -> Plan:
    """Split a memory budget: always-active weights first, then the KV cache and a runtime reserve, the
    rest to the expert arena. `expert_cache` gives the arena size directly instead."""
    from .info import describe
    d = describe(f)
    groups = _expert_tensors(f)
    sizes = []
    n_experts = 0
    for parts in groups:
        infos = [f.tensor_infos[p] for p in parts]
        n_exp = int(infos[0].ne[-1])
        n_experts += n_exp
        sizes.append(tuple(i.nbytes // n_exp for i in infos))
    slot_bytes, _ = _slot_layout(sizes) if sizes else (0, None)
    if kv_bytes is None:
        kv_bytes = _kv_estimate(f, n_ctx)
    # the embedding is read a row per token, but its pages are spread over the vocabulary: count it all
    tied = "output.weight" not in f.tensor_infos  # then describe() already counts the embedding
    always = d["always_active_bytes"] + (0 if tied else d["embedding_bytes"])
    if expert_cache is None and mem_budget is None:
        cache = 0
    elif expert_cache is not None:
        cache = expert_cache
        if slot_bytes and cache < slot_bytes:
            raise ValueError(f"expert cache of {expert_cache} bytes holds no expert: one takes {slot_bytes} bytes"
                             f" (an expert's gate, up and down with O_DIRECT alignment)")
    else:
        cache = mem_budget - always - kv_bytes - reserve
        if cache < slot_bytes:
            raise ValueError(f"memory budget {mem_budget} bytes leaves no room for the expert cache: always-active"
                             f" weights {always}, KV cache {kv_bytes} and runtime reserve {reserve} bytes need"
                             f" {always + kv_bytes + reserve + slot_bytes} with room for one expert")
    n_slots = min(cache // slot_bytes, n_experts) if slot_bytes else 0
    return Plan(file_bytes=f.file_size, always_active_bytes=always, routed_bytes=d["routed_expert_bytes"],
                n_experts=n_experts, expert_bytes=max((sum(s) for s in sizes), default=0), slot_bytes=slot_bytes,
                kv_bytes=kv_bytes, reserve_bytes=reserve, mem_budget=mem_budget, cache_bytes=n_slots * slot_bytes,
                n_slots=n_slots)


def _kv_estimate(f: GGUFFile, n_ctx: int) -> int:
    """f16 K and V for every trunk layer at n_ctx (sliding layers hold less; this is an upper bound)."""
    arch = f.arch
    md = f.metadata
    n_layer = md.get(f"{arch}.block_count", 0) - md.get(f"{arch}.nextn_predict_layers", 0)
    kv = md.get(f"{arch}.attention.head_count_kv", md.get(f"{arch}.attention.head_count", 0))
    kv = max(kv) if isinstance(kv, list) else kv
    n_embd = md.get(f"{arch}.embedding_length", 0)
    heads = md.get(f"{arch}.attention.head_count", 1)
    heads = max(heads) if isinstance(heads, list) else heads
    hd_k = md.get(f"{arch}.attention.key_length", n_embd // max(heads, 1))
    hd_v = md.get(f"{arch}.attention.value_length", hd_k)
    return int(n_layer * n_ctx * kv * (hd_k + hd_v) * 2)


# -- statistics -----------------------------------------------------------------------------------------

@dataclass
class LayerStats:
    hits: int = 0              # expert resident when the layer asked (prefetched ones included)
    prefetch_hits: int = 0     # ... of which resident because the prefetcher read it
    misses: int = 0            # read on demand into the arena
    mapped: int = 0            # served from the mapping: the batch needed more experts than slots
    bytes_read: int = 0        # demand + prefetch reads (and mapped experts' bytes)
    predicted: int = 0         # experts the prefetcher named for this layer
    predicted_used: int = 0    # ... that the layer then used
    used_when_predicted: int = 0  # experts the layer used, on steps where a prediction was made

    @property
    def requests(self) -> int:
        return self.hits + self.misses + self.mapped


@dataclass
class CacheStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)
    tokens: int = 0

    def totals(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            for k in t.__dataclass_fields__:
                setattr(t, k, getattr(t, k) + getattr(s, k))
        return t

    def summary(self) -> dict:
        t = self.totals()
        return {"tokens": self.tokens, "hit_rate": t.hits / t.requests if t.requests else 0.0,
                "bytes_read": t.bytes_read, "bytes_per_token": t.bytes_read / self.tokens if self.tokens else 0.0,
                "prefetch_recall": t.predicted_used / t.used_when_predicted if t.used_when_predicted else 0.0,
                "prefetch_precision": t.predicted_used / t.predicted if t.predicted else 0.0,
                "misses": t.misses, "mapped": t.mapped, "prefetch_hits": t.prefetch_hits}


class _Reader:
    """Reads byte ranges of the file's shards into the arena, bypassing the page cache when it can."""

    def __init__(self, f: GGUFFile, direct: bool):
        self.fds, self.direct = [], []
        self.paths = [shard.path for shard in f._shards]
        for shard in f._shards:
            fd = -1
            if direct and hasattr(os, "O_DIRECT"):
                try:
                    fd = os.open(shard.path, os.O_RDONLY | os.O_DIRECT)
                except OSError:  # tmpfs and some overlay filesystems refuse O_DIRECT
                    fd = -1
            self.direct.append(fd >= 0)
            self.fds.append(fd if fd >= 0 else os.open(shard.path, os.O_RDONLY))

    def read(self, shard: int, offset: int, n: int, dst: memoryview, dst_off: int) -> int:
        """Bytes [offset, offset + n) of the shard land at dst[dst_off:]; with O_DIRECT the aligned
        superset is read to dst[dst_off - (offset % 4096):]. Returns bytes transferred from disk."""
        fd = self.fds[shard]
        if self.direct[shard]:
            start = offset - offset % DIRECT_ALIGN
            length = _round_up(offset + n, DIRECT_ALIGN) - start
            buf, pos, done = dst[dst_off - (offset - start): dst_off - (offset - start) + length], 0, 0
            while pos < length:
                got = os.preadv(fd, [buf[pos:]], start + pos)
                if got <= 0:
                    break
                pos += got
            if pos < offset - start + n:
                raise OSError(f"{self.paths[shard]}: short read at offset {start}: {pos} of"
                              f" {offset - start + n} bytes (file truncated?)")
            return pos
        pos = 0
        while pos < n:
            got = os.preadv(fd, [dst[dst_off + pos: dst_off + n]], offset + pos)
            if got <= 0:
                raise OSError(f"{self.paths[shard]}: short read at offset {offset}: {pos} of {n} bytes"
                              f" (file truncated?)")
            pos += got
        # a buffered read leaves the pages in the page cache, which a memory cgroup charges to us
        os.posix_fadvise(fd, offset, n, os.POSIX_FADV_DONTNEED)
        return n

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


@dataclass
class _Layer:
    il: int
    n_expert: int
    ptrs: tuple                  # ExpertStore's (gate, up, down) pointer arrays, rewritten in place
    mapped: tuple                # the mapped pointer of each part, per expert
    parts: tuple                 # per part: (shard, file offset of expert 0, stride, bytes)
    slot_of: np.ndarray          # expert -> slot, -1 when not resident
    score: np.ndarray            # decayed use count at `stamp`
    stamp: np.ndarray
    counts: np.ndarray           # loaded (saved) counts, for save_stats
    loaded_tokens: int = 0


class ExpertCache:
    """The routed experts of an ExpertStore placed under a byte budget; see the module docstring."""

    def __init__(self, store, capacity_bytes: int, *, half_life: float = DEFAULT_HALF_LIFE, prefetch: bool = True,
                 mlock: bool = False, direct_io: bool = True, io_threads: int = 8, prefetch_max_tokens: int = 4,
                 advise: bool = True, more_stores=()):
        if not store.layers:
            raise ValueError("the model has no routed experts to cache")
        self.store = store
        # other stores of the same file share the arena (the MTP heads' experts: a draft step must not
        # fault them in through the page cache); their layer ids must be distinct from the trunk's
        self.stores = [store, *more_stores]
        f = store.file
        self.layers: dict[int, _Layer] = {}
        sizes = []
        all_layers = [(il, L) for st in self.stores for il, L in st.layers.items()]
        if len({il for il, _ in all_layers}) != len(all_layers):
            raise ValueError("expert stores sharing a cache must have distinct layer ids")
        for il, L in sorted(all_layers, key=lambda t: t[0]):
            parts, mapped = [], []
            for p, t in enumerate((L.gate, L.up, L.down)):
                info = f.tensor_infos[t.name]
                stride = t.nbytes // L.n_expert
                parts.append((info.shard, info.offset, stride, stride))
                mapped.append([L.ptrs[p][e] for e in range(L.n_expert)])
            sizes.append(tuple(p[3] for p in parts))
            self.layers[il] = _Layer(il, L.n_expert, L.ptrs, tuple(mapped), tuple(parts),
                                     np.full(L.n_expert, -1, np.int32), np.zeros(L.n_expert), np.zeros(L.n_expert),
                                     np.zeros(L.n_expert, np.int64))
        self.slot_bytes, self.region_off = _slot_layout(sizes)
        n_all = sum(L.n_expert for L in self.layers.values())
        self.n_slots = min(capacity_bytes // self.slot_bytes, n_all)
        if self.n_slots <= 0:
            raise ValueError(f"expert cache of {capacity_bytes} bytes holds no expert (one takes {self.slot_bytes})")
        self.capacity_bytes = self.n_slots * self.slot_bytes
        self.arena = mmap.mmap(-1, self.capacity_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.view = memoryview(self.arena)
        self._base = _ffi.from_buffer("uint8_t[]", self.arena)
        self.locked = False
        if mlock:
            self._mlock()
        self.slot_layer = np.full(self.n_slots, -1, np.int32)
        self.slot_expert = np.full(self.n_slots, -1, np.int32)
        self.slot_future: list[Future | None] = [None] * self.n_slots
        self.slot_prefetched = np.zeros(self.n_slots, bool)
        self.free = list(range(self.n_slots - 1, -1, -1))
        self.decay = 0.5 ** (1.0 / half_life)
        self.half_life = half_life
        self.tick = 0
        self.first_layer = min(store.layers)   # the trunk's first MoE layer counts tokens
        self.stats = CacheStats({il: LayerStats() for il in self.layers})
        self.reader = _Reader(f, direct_io)
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="expert-io")
        self.prefetch_enabled = prefetch
        self.prefetch_max_tokens = prefetch_max_tokens
        self.pending: dict[int, set[int]] = {}   # layer -> experts predicted for its next call
        self.in_use: set[int] = set()            # slots the layer being computed points at
        self.next_moe: dict[int, tuple] = {}     # layer -> (next layer, its router, norm ratio)
        self._lock = threading.Lock()
        if advise:
            self._advise()

    # -- setup ------------------------------------------------------------------------------------------
    def _mlock(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        addr = int(_ffi.cast("uintptr_t", self._base))
        if libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(self.capacity_bytes)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mlock of the {self.capacity_bytes}-byte expert cache failed: {os.strerror(err)}"
                               f" (raise `ulimit -l` or run without --mlock)")
        self.locked = True

    def _advise(self) -> None:
        """MADV_RANDOM on the expert tensors (no readahead into experts nobody asked for); WILLNEED on
        everything else, the always-active weights, which every token reads."""
        f = self.store.file
        expert_names = {t.name for st in self.stores for L in st.layers.values() for t in (L.gate, L.up, L.down)}
        for name, info in f.tensor_infos.items():
            start = info.offset - info.offset % PAGE
            length = info.offset + info.nbytes - start
            advice = mmap.MADV_RANDOM if name in expert_names else mmap.MADV_WILLNEED
            try:
                f._shards[info.shard].map.madvise(advice, start, length)
            except (OSError, ValueError, AttributeError):
                pass  # advice only

    def attach_prefetch(self, model) -> int:
        """Find each MoE layer's successor (router and ffn norm) in `model.blocks`; returns how many
        layers got a predictor. The prediction input is L's normalised hidden state rescaled by the
        ratio of L+1's norm weight to L's: rms_norm(h) * w_{L+1} = x_L * w_{L+1} / w_L."""
        from .moe import MoE
        moes = [(b.ffn.il, b.ffn.router, np.asarray(b.ffn_norm, np.float32)) for b in getattr(model, "blocks", [])
                if isinstance(getattr(b, "ffn", None), MoE) and getattr(b, "ffn_norm", None) is not None]
        for (il, _, w0), (jl, router, w1) in zip(moes, moes[1:]):
            safe = np.where(np.abs(w0) > 1e-12, w0, 1.0)
            self.next_moe[il] = (jl, router, (w1 / safe).astype(np.float32))
        return len(self.next_moe)

    # -- placement ----------------------------------------------------------------------------------------
    def _eff(self, L: _Layer, idx) -> np.ndarray:
        return L.score[idx] * self.decay ** (self.tick - L.stamp[idx])

    def _slot_scores(self) -> np.ndarray:
        out = np.full(self.n_slots, np.inf)
        for il, L in self.layers.items():
            m = self.slot_layer == il
            if m.any():
                out[m] = self._eff(L, self.slot_expert[m])
        return out

    def _victims(self, k: int, protect: set[int], admit: np.ndarray | None = None) -> list[int]:
        """Up to k slots to fill: free ones first, then the lowest-scored resident experts not in
        `protect` and not being read. With `admit` (the newcomers' scores, descending) the j-th evicted
        expert must score below the j-th remaining newcomer: a batch does not push out a hotter set."""
        got = []
        while self.free and len(got) < k:
            got.append(self.free.pop())
        if len(got) == k:
            return got
        n_free = len(got)
        sc = self._slot_scores()
        for s in protect:
            sc[s] = np.inf
        for s, fut in enumerate(self.slot_future):
            if fut is not None and not fut.done():
                sc[s] = np.inf
        for s in got:
            sc[s] = np.inf
        need = k - len(got)
        cand = np.argpartition(sc, min(need, self.n_slots - 1))[:need] if need < self.n_slots else np.argsort(sc)
        for s in cand[np.argsort(sc[cand], kind="stable")]:
            if not np.isfinite(sc[s]) or len(got) >= k:
                break
            if admit is not None and not sc[s] < admit[len(got)]:
                break
            self._evict(int(s))
            got.append(int(s))
        return got

    def _evict(self, s: int) -> None:
        il, e = int(self.slot_layer[s]), int(self.slot_expert[s])
        if il >= 0:
            L = self.layers[il]
            for p in range(3):
                L.ptrs[p][e] = L.mapped[p][e]
            L.slot_of[e] = -1
        self.slot_layer[s] = self.slot_expert[s] = -1
        self.slot_prefetched[s] = False

    def _will_need(self, L: _Layer, e: int) -> None:
        """An expert served from the mapping: ask for it in one readahead (the tensors are MADV_RANDOM,
        so page faults alone would read it 4 KiB at a time)."""
        for shard, off0, stride, n in L.parts:
            off = off0 + e * stride
            start = off - off % PAGE
            try:
                self.store.file._shards[shard].map.madvise(mmap.MADV_WILLNEED, start, off + n - start)
            except (OSError, ValueError):
                pass

    def _load(self, L: _Layer, e: int, s: int) -> Future:
        """Point expert e at slot s and read it there on the I/O pool."""
        base = s * self.slot_bytes
        for p, (shard, off0, stride, n) in enumerate(L.parts):
            off = off0 + e * stride
            L.ptrs[p][e] = self._base + base + self.region_off[p] + off % DIRECT_ALIGN
        L.slot_of[e] = s
        self.slot_layer[s], self.slot_expert[s] = L.il, e
        fut = self.pool.submit(self._read_expert, L, e, s)
        self.slot_future[s] = fut
        return fut

    def _read_expert(self, L: _Layer, e: int, s: int) -> int:
        base, total = s * self.slot_bytes, 0
        for p, (shard, off0, stride, n) in enumerate(L.parts):
            off = off0 + e * stride
            total += self.reader.read(shard, off, n, self.view, base + self.region_off[p] + off % DIRECT_ALIGN)
        with self._lock:  # runs on an I/O thread
            self.stats.layers[L.il].bytes_read += total
        return total

    def prepare(self, il: int, ids: np.ndarray, x: np.ndarray | None = None) -> None:
        """Make layer il's pointer arrays point at the experts `ids` selects, resident where possible;
        then start the prefetch for the next MoE layer from `x` (this layer's normalised input)."""
        L = self.layers[il]
        st = self.stats.layers[il]
        n_tok = ids.shape[0]
        if il == self.first_layer:
            self.tick += n_tok
            self.stats.tokens += n_tok
        c = np.bincount(ids.ravel(), minlength=L.n_expert)
        needed = np.flatnonzero(c)
        L.score[needed] = self._eff(L, needed) + c[needed]
        L.stamp[needed] = self.tick

        predicted = self.pending.pop(il, None)
        if predicted is not None:
            used = set(needed.tolist())
            st.predicted_used += len(predicted & used)
            st.used_when_predicted += len(used)

        waits, missing = [], []
        resident_slots = set()
        for e in needed.tolist():
            s = int(L.slot_of[e])
            if s >= 0:
                st.hits += 1
                if self.slot_prefetched[s]:
                    st.prefetch_hits += 1
                    self.slot_prefetched[s] = False
                resident_slots.add(s)
                fut = self.slot_future[s]
                if fut is not None and not fut.done():
                    waits.append(fut)
            else:
                missing.append(e)
        if missing:
            admit = None
            if n_tok > self.prefetch_max_tokens:
                # a batch (prefill) names most experts once: it may take free slots and colder experts'
                # slots, never a hotter expert's (which would throw away a warm start)
                missing.sort(key=lambda e: -L.score[e])
                admit = L.score[missing]
            slots = self._victims(len(missing), resident_slots, admit)
            for e, s in zip(missing, slots):
                waits.append(self._load(L, e, s))
                resident_slots.add(s)
                st.misses += 1
            for e in missing[len(slots):]:
                st.mapped += 1  # no slot for it this call: the pointer stays on the mapping
                st.bytes_read += sum(p[3] for p in L.parts)
                self._will_need(L, e)
        for fut in waits:
            try:
                fut.result()
            except Exception:
                # a failed read leaves its slot half written: point the expert back at the mapping
                for s, f in enumerate(self.slot_future):
                    if f is not None and f.done() and f.exception() is not None:
                        self._evict(s)
                        self.free.append(s)
                        self.slot_future[s] = None
                raise
        self.in_use = resident_slots
        for s in resident_slots:
            self.slot_future[s] = None
        if self.prefetch_enabled and x is not None and il in self.next_moe and n_tok <= self.prefetch_max_tokens:
            self._prefetch(il, x)

    def _prefetch(self, il: int, x: np.ndarray) -> None:
        jl, router, ratio = self.next_moe[il]
        ids, _ = router(x * ratio)
        predicted = set(np.unique(ids).tolist())
        self.pending[jl] = predicted
        J = self.layers[jl]
        st = self.stats.layers[jl]
        st.predicted += len(predicted)
        missing = [e for e in sorted(predicted) if J.slot_of[e] < 0]
        if not missing:
            return
        # the predicted experts already resident must stay so: they are the hits of the next call
        keep = self.in_use | {int(J.slot_of[e]) for e in predicted if J.slot_of[e] >= 0}
        slots = self._victims(len(missing), keep)
        for e, s in zip(missing, slots):
            self._load(J, e, s)
            self.slot_prefetched[s] = True

    # -- warm start ---------------------------------------------------------------------------------------
    def warm(self, counts: dict[int, np.ndarray]) -> int:
        """Fill free slots with the most used experts by `counts` (layer -> per-expert counts); returns
        how many were read."""
        ranked = sorted(((int(c[e]), il, e) for il, c in counts.items() if il in self.layers
                         for e in range(len(c)) if c[e] > 0), reverse=True)
        futs = []
        for _, il, e in ranked:
            if not self.free:
                break
            L = self.layers[il]
            if L.slot_of[e] >= 0:
                continue
            futs.append(self._load(L, e, self.free.pop()))
        for fu in futs:
            fu.result()
        self.slot_future = [None] * self.n_slots
        self.reset_stats()  # load-time reads are not the run's
        return len(futs)

    def reset_stats(self) -> None:
        self.stats = CacheStats({il: LayerStats() for il in self.layers})

    def resident(self) -> dict[int, list[int]]:
        """layer -> the experts resident now, by id."""
        return {il: np.flatnonzero(L.slot_of >= 0).tolist() for il, L in self.layers.items()}

    def report(self) -> list[str]:
        """Per layer and in total: hit rate, demand misses, prefetch accuracy, bytes read per token."""
        from .progress import human_bytes as hb
        lines = []
        for il, s in sorted(self.stats.layers.items()):
            if not s.requests:
                continue
            rec = f"{s.predicted_used / s.used_when_predicted:.0%}" if s.used_when_predicted else "-"
            lines.append(f"layer {il:>3}: hit {s.hits / s.requests:6.1%} ({s.prefetch_hits} prefetched),"
                         f" {s.misses} read, {s.mapped} mapped, prefetch recall {rec}, read {hb(s.bytes_read)}")
        t = self.stats.summary()
        lines.append(f"expert cache: {self.n_slots} slots ({hb(self.capacity_bytes)}{', mlocked' if self.locked else ''}),"
                     f" {self.stats.tokens} tokens, hit rate {t['hit_rate']:.1%}, read {hb(t['bytes_per_token'])}/token,"
                     f" prefetch recall {t['prefetch_recall']:.1%} precision {t['prefetch_precision']:.1%}"
                     f" ({'O_DIRECT' if all(self.reader.direct) else 'buffered'} reads)")
        return lines

    def close(self) -> None:
        """Stop the I/O threads and point every expert back at the mapping, so the model stays usable
        (uncached) after the arena is gone."""
        self.pool.shutdown(wait=True)
        for s in range(self.n_slots):
            self._evict(s)
        for st in self.stores:
            if st.cache is self:
                st.cache = None
        self.reader.close()


def save_stats(path: str | os.PathLike, store, extra: dict[int, tuple[np.ndarray, int]] | None = None) -> None:
    """Write per-layer expert use counts (this run's plus `extra`, what was loaded) as JSON."""
    layers = {}
    for il in sorted(store.counts):
        c = store.counts[il].astype(np.int64).copy()
        t = int(store.tokens[il])
        if extra and il in extra:
            c += extra[il][0]
            t += extra[il][1]
        layers[str(il)] = {"tokens": t, "counts": c.tolist()}
    doc = {"format": STATS_FORMAT, "version": 1, "model": os.path.basename(store.file.path),
           "n_expert": {str(il): int(L.n_expert) for il, L in store.layers.items()}, "layers": layers}
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike, store) -> dict[int, tuple[np.ndarray, int]]:
    """Read a save_stats file for this store: layer -> (counts, tokens). A file for another model (other
    layers or expert counts) is a ValueError saying so."""
    with open(path) as fh:
        try:
            doc = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not an expert statistics file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != STATS_FORMAT:
        raise ValueError(f"{path}: not an expert statistics file (format {STATS_FORMAT!r} expected)")
    out = {}
    for key, v in doc.get("layers", {}).items():
        il = int(key)
        if il not in store.layers:
            raise ValueError(f"{path}: statistics for layer {il}, which has no routed experts in {store.file.path}")
        c = np.asarray(v["counts"], dtype=np.int64)
        if len(c) != store.layers[il].n_expert or (c < 0).any():
            raise ValueError(f"{path}: layer {il} has {len(c)} counts, the model {store.layers[il].n_expert} experts")
        out[il] = (c, int(v["tokens"]))
    return out


def seed_scores(cache: ExpertCache, loaded: dict[int, tuple[np.ndarray, int]]) -> None:
    """Start each expert's score at the steady state of its saved rate: rate / (1 - decay)."""
    for il, (c, t) in loaded.items():
        if t > 0:
            L = cache.layers[il]
            L.score[:] = c / t / (1.0 - cache.decay)
            L.stamp[:] = cache.tick
