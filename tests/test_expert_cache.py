"""Expert placement (ggufrun/expert_cache.py): budget, eviction policy, statistics files, prefetch,
output identical to the uncached model, the plan and SIZE parsing. Small step35 files only: fast."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import ggufrun
import quant
from ggufrun import cli
from ggufrun.expert_cache import ExpertCache, load_stats, parse_size, plan, save_stats
from ggufrun.gguf_file import GGUFFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
import step35_tiny  # noqa: E402

TEXT = "The history of the printing press begins in the fifteenth century, when movable type"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """wide-swa: 32 experts top 8 over four MoE layers, Q4_K_M (Q6_K downs on some layers, so slots
    must fit the largest expert)."""
    d = tmp_path_factory.mktemp("expert_cache")
    return str(step35_tiny.write(step35_tiny.CONFIGS["wide-swa"], "Q4_K_M", d / "wide-swa-Q4_K_M.gguf"))


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    """A model whose residual stream never changes (attention outputs and expert downs are zero), so
    applying layer L+1's router to layer L's hidden state is exactly layer L+1's routing: the prefetch
    prediction must be right every time."""
    cfg = replace(step35_tiny.CONFIGS["gqa"], n_nextn=0, name="still")
    w = step35_tiny.weights(cfg)
    for name in w:
        if name.endswith(("attn_output.weight", "ffn_down_exps.weight", "ffn_down_shexp.weight", "ffn_down.weight")):
            w[name] = np.zeros_like(w[name])
    path = tmp_path_factory.mktemp("still") / "still-F32.gguf"
    quant.write_gguf(path, step35_tiny.ARCH, step35_tiny.metadata(cfg, 0), {k: (v, "F32") for k, v in w.items()})
    return str(path)


def _store(path, slots=None, **kw):
    llm = ggufrun.load(path, n_ctx=256)
    if slots is not None:
        probe = ExpertCache(llm.model.experts, 1 << 40, prefetch=False, advise=False)
        slot = probe.slot_bytes
        probe.close()
        cache = ExpertCache(llm.model.experts, slots * slot, **kw)
        llm.model.experts.cache = llm.expert_cache = cache
    return llm


# -- SIZE strings -----------------------------------------------------------------------------------------

def test_parse_size():
    assert parse_size("1048576") == 1 << 20
    assert parse_size("800M") == 800 << 20
    assert parse_size("800MiB") == 800 << 20
    assert parse_size("800MB") == 800_000_000
    assert parse_size("1.5G") == int(1.5 * (1 << 30))
    assert parse_size(" 2 k ") == 2048
    for bad in ("", "M", "12X", "1.2.3G", "-5M", "5 MBs", "5i", "ten"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_cli_bad_size_is_a_clear_error(tiny, capsys):
    assert cli.main(["run", "-m", tiny, "-p", "hi", "-n", "1", "--mem-budget", "12X"]) == 1
    err = capsys.readouterr().err
    assert "invalid size '12X'" in err and "800M" in err


# -- budget and plan --------------------------------------------------------------------------------------

def test_cache_respects_its_byte_budget(tiny):
    llm = ggufrun.load(tiny, n_ctx=256, expert_cache="1M")
    cache = llm.expert_cache
    assert cache.capacity_bytes <= parse_size("1M") < cache.capacity_bytes + cache.slot_bytes
    assert len(cache.arena) == cache.capacity_bytes
    # every slot region fits the largest expert of any layer, with O_DIRECT slack
    largest = max(sum(p[3] for p in L.parts) for L in cache.layers.values())
    assert cache.slot_bytes >= largest
    llm.generate(TEXT, max_tokens=12, temperature=0)
    resident = sum(len(v) for v in cache.resident().values())
    assert 0 < resident <= cache.n_slots
    # the pointer of every resident expert lies in its slot, every other one in the mapping
    base = int(ggufrun.native._ffi.cast("uintptr_t", cache._base))
    for il, L in cache.layers.items():
        for e in range(L.n_expert):
            for p in range(3):
                ptr = int(ggufrun.native._ffi.cast("uintptr_t", L.ptrs[p][e]))
                s = int(L.slot_of[e])
                if s >= 0:
                    assert base + s * cache.slot_bytes <= ptr < base + (s + 1) * cache.slot_bytes
                else:
                    assert ptr == int(ggufrun.native._ffi.cast("uintptr_t", L.mapped[p][e]))
    llm.close()
    # closing unmaps nothing under the model: every pointer is back on the mapping and it still runs
    assert llm.model.experts.cache is None
    for L in cache.layers.values():
        for p in range(3):
            assert all(L.ptrs[p][e] == L.mapped[p][e] for e in range(L.n_expert))
    assert llm.generate(TEXT, max_tokens=2, temperature=0)


def test_plan_from_memory_budget(tiny):
    with GGUFFile(tiny) as f:
        p = plan(f, mem_budget=parse_size("300M"), n_ctx=256, kv_bytes=1 << 20)
        assert p.cache_bytes <= p.mem_budget - p.always_active_bytes - p.kv_bytes - p.reserve_bytes
        assert p.n_slots == min((p.mem_budget - p.always_active_bytes - p.kv_bytes - p.reserve_bytes)
                                // p.slot_bytes, p.n_experts)
        with pytest.raises(ValueError, match="leaves no room for the expert cache"):
            plan(f, mem_budget=parse_size("100M"))
        with pytest.raises(ValueError, match="holds no expert"):
            plan(f, expert_cache=1000)


def test_info_plan_prints_without_loading(tiny, capsys):
    assert cli.main(["info", tiny, "--plan", "--expert-cache", "1M", "-c", "256"]) == 0
    out = capsys.readouterr().out
    assert "placement plan (not loaded)" in out
    assert "always-active" in out and "KV cache" in out
    with GGUFFile(tiny) as f:
        n = plan(f, expert_cache=1 << 20).n_slots
    assert f"expert cache       1{'.0 MiB'}: {n} slots" in out or f": {n} slots of" in out
    assert cli.main(["info", tiny, "--plan"]) == 1
    assert "--plan needs --mem-budget" in capsys.readouterr().err


# -- eviction policy --------------------------------------------------------------------------------------

def _ids(*experts):
    return np.array([list(experts)], dtype=np.int32)


def test_eviction_prefers_frequent_experts(tiny):
    llm = _store(tiny, slots=2, prefetch=False, half_life=1e9)  # no decay: pure frequency
    cache, il = llm.expert_cache, min(llm.expert_cache.layers)
    for _ in range(5):
        cache.prepare(il, _ids(0))
    cache.prepare(il, _ids(1))
    cache.prepare(il, _ids(2))            # full: evicts the less used of 0 (5 uses) and 1 (1 use)
    assert cache.resident()[il] == [0, 2]
    st = cache.stats.layers[il]
    assert (st.hits, st.misses) == (4, 3)
    llm.close()


def test_eviction_forgets_with_the_half_life(tiny):
    llm = _store(tiny, slots=2, prefetch=False, half_life=1.0)  # recency dominates
    cache, il = llm.expert_cache, min(llm.expert_cache.layers)
    for _ in range(3):
        cache.prepare(il, _ids(0))        # score 0: 1.75 at tick 3
    for _ in range(4):
        cache.prepare(il, _ids(1))        # score 1: 1.875 at tick 7; 0's has decayed to 0.11
    cache.prepare(il, _ids(2))
    assert cache.resident()[il] == [1, 2]
    llm.close()


def test_batch_wider_than_the_cache_uses_the_mapping(tiny):
    llm = _store(tiny, slots=3, prefetch=False)
    cache, il = llm.expert_cache, min(llm.expert_cache.layers)
    cache.prepare(il, np.arange(8, dtype=np.int32).reshape(1, 8))
    st = cache.stats.layers[il]
    assert (st.misses, st.mapped) == (3, 5)
    assert len(cache.resident()[il]) == 3
    llm.close()


# -- output is the same wherever experts live --------------------------------------------------------------

# (slots, O_DIRECT reads or the buffered fallback, arena mlock'ed)
@pytest.mark.parametrize("slots,direct_io,mlock", [(1, True, False), (9, False, False), (40, True, True)])
def test_cached_output_equals_uncached(tiny, slots, direct_io, mlock):
    ref = ggufrun.load(tiny, n_ctx=256)
    ids = ref.tokenize(TEXT)
    want_logits = ref.logits(ids)
    want = ref.generate(ids, max_tokens=16, temperature=0)
    try:
        llm = _store(tiny, slots=slots, prefetch=True, direct_io=direct_io, mlock=mlock)
    except OSError as e:   # an unprivileged user with a small `ulimit -l`
        pytest.skip(f"mlock not permitted here: {e}")
    cache = llm.expert_cache
    if direct_io and not all(cache.reader.direct):
        pytest.skip("this filesystem refuses O_DIRECT; the buffered case covers the fallback")
    assert all(cache.reader.direct) == direct_io
    assert cache.locked == mlock
    assert np.array_equal(llm.logits(ids), want_logits)
    assert llm.generate(ids, max_tokens=16, temperature=0) == want
    s = cache.stats.summary()
    assert s["misses"] > 0 and s["bytes_read"] > 0
    llm.close()


# -- statistics files and warm start -----------------------------------------------------------------------

def test_stats_save_load_round_trip(tiny, tmp_path):
    llm = ggufrun.load(tiny, n_ctx=256)
    llm.generate(TEXT, max_tokens=8, temperature=0)
    store = llm.model.experts
    path = tmp_path / "stats.json"
    save_stats(path, store)
    loaded = load_stats(path, store)
    assert set(loaded) == set(store.counts)
    for il, (c, t) in loaded.items():
        assert np.array_equal(c, store.counts[il]) and t == store.tokens[il]
    # saving again with what was loaded accumulates
    save_stats(path, store, loaded)
    again = load_stats(path, store)
    for il, (c, t) in again.items():
        assert np.array_equal(c, 2 * store.counts[il]) and t == 2 * store.tokens[il]
    doc = json.loads(path.read_text())
    doc["layers"][str(min(store.layers))]["counts"].append(1)
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="counts, the model"):
        load_stats(path, store)
    path.write_text("{}")
    with pytest.raises(ValueError, match="not an expert statistics file"):
        load_stats(path, store)


def test_warm_start_loads_the_most_used_experts(tiny, tmp_path):
    store = ggufrun.load(tiny, n_ctx=256).model.experts
    layers = sorted(store.layers)
    counts = {il: np.zeros(store.layers[il].n_expert, np.int64) for il in layers}
    counts[layers[0]][[3, 7]] = [100, 90]
    counts[layers[1]][5] = 80
    counts[layers[2]][[1, 2]] = [10, 5]
    path = tmp_path / "warm.json"
    store.counts, store.tokens = counts, {il: 100 for il in layers}
    save_stats(path, store)
    probe = ExpertCache(store, 1 << 40, prefetch=False, advise=False)
    slot = probe.slot_bytes
    probe.close()
    llm = ggufrun.load(tiny, n_ctx=256, expert_cache=4 * slot, expert_stats_file=str(path))
    res = llm.expert_cache.resident()
    assert res[layers[0]] == [3, 7] and res[layers[1]] == [5] and res[layers[2]] == [1]
    assert llm.expert_cache.stats.summary()["bytes_read"] == 0  # load-time reads are not the run's
    llm.close()


def test_cli_expert_stats_file_written_and_reused(tiny, tmp_path, capsys):
    path = tmp_path / "s.json"
    args = ["run", "-m", tiny, "-p", "Once upon a time", "-n", "6", "--temp", "0", "--expert-cache", "2M",
            "--expert-stats", "--expert-stats-file", str(path)]
    assert cli.main(args) == 0
    first = capsys.readouterr()
    assert path.exists() and "expert cache:" in first.err and "hit rate" in first.err
    assert cli.main(args) == 0
    second = capsys.readouterr()
    assert second.out == first.out
    doc = json.loads(path.read_text())
    il = str(min(int(k) for k in doc["layers"]))
    assert doc["layers"][il]["tokens"] > 0


# -- prefetch ---------------------------------------------------------------------------------------------

def test_prefetch_predicts_exactly_when_the_stream_is_still(still):
    ref = ggufrun.load(still, n_ctx=256)
    ids = ref.tokenize(TEXT)
    want = ref.generate(ids, max_tokens=10, temperature=0)
    llm = _store(still, slots=40, prefetch=True)
    assert llm.expert_cache.attach_prefetch(llm.model) == len(llm.expert_cache.layers) - 1
    llm.generate(ids[:-1], max_tokens=1, temperature=0)   # prefill: batches are not prefetched
    llm.expert_cache.reset_stats()
    assert llm.generate(ids, max_tokens=10, temperature=0) == want
    s = llm.expert_cache.stats.summary()
    assert s["prefetch_recall"] == 1.0 and s["prefetch_precision"] == 1.0
    # every layer after the first MoE layer found its experts resident, prefetched or cached
    first = min(llm.expert_cache.layers)
    for il, st in llm.expert_cache.stats.layers.items():
        if il != first:
            assert st.misses == 0 and st.hits == st.requests > 0
    assert s["prefetch_hits"] > 0
    llm.close()


def test_prefetch_on_random_routing_is_partly_right(tiny):
    llm = _store(tiny, slots=60, prefetch=True)
    llm.expert_cache.attach_prefetch(llm.model)
    llm.generate(TEXT, max_tokens=12, temperature=0)
    s = llm.expert_cache.stats.summary()
    # 8 of 32 by chance would be 25%; the hidden state carries over between layers
    assert 0.4 < s["prefetch_recall"] <= 1.0
    llm.close()


def test_file_truncated_under_the_cache_is_a_clear_error(tiny, tmp_path):
    """A miss read that comes back short (the file shrank after loading) names the file; it never hands
    the kernels a half-filled slot."""
    import shutil
    path = tmp_path / "shrinking.gguf"
    shutil.copy(tiny, path)
    llm = _store(str(path), slots=2, prefetch=False)
    cache = llm.expert_cache
    il = max(cache.layers)
    L = cache.layers[il]
    shard, off0, stride, n = L.parts[2]   # the last expert's down projection is near the end of its tensor
    os.truncate(path, off0 + (L.n_expert - 1) * stride + n // 2)
    with pytest.raises(OSError, match="shrinking.gguf: short read"):
        cache.prepare(il, np.array([[L.n_expert - 1]], dtype=np.int32))
    assert L.slot_of[L.n_expert - 1] == -1   # not left pointing at a half-read slot
    assert L.ptrs[2][L.n_expert - 1] == L.mapped[2][L.n_expert - 1]


def test_mtp_heads_share_the_cache(tiny):
    """The MTP heads' routed experts live in the same arena as the trunk's: drafting reads them through
    the cache (counted per head layer), and MTP output stays the plain greedy output."""
    ref = ggufrun.load(tiny, n_ctx=256)
    want = ref.generate(TEXT, max_tokens=12, temperature=0, mtp=0)
    n_trunk = len(ref.model.blocks)
    ref.close()
    llm = ggufrun.load(tiny, n_ctx=256, expert_cache="2M")
    cache = llm.expert_cache
    mtp_layers = sorted(llm.model.mtp_experts.layers)
    assert mtp_layers and min(mtp_layers) >= n_trunk
    assert set(mtp_layers) <= set(cache.layers) and llm.model.mtp_experts.cache is cache
    assert llm.generate(TEXT, max_tokens=12, temperature=0, mtp=3) == want
    assert sum(cache.stats.layers[il].requests for il in mtp_layers) > 0
    assert cache.stats.tokens > 0
    llm.close()
    assert llm.model.mtp_experts.cache is None


def test_stores_sharing_a_cache_need_distinct_layers(tiny):
    llm = ggufrun.load(tiny, n_ctx=256)
    store = llm.model.experts
    with pytest.raises(ValueError, match="distinct layer ids"):
        ExpertCache(store, 1 << 24, prefetch=False, advise=False, more_stores=[store])
