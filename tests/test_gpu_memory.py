"""gpu_memory's calibration figures that need no GPU to check: the reserve detail is read
from a torch-like object and the allocator's stats, so a fake state stands in for CUDA's."""

from __future__ import annotations

from types import SimpleNamespace

from vramfit.gpu_memory import GIB, _reserve_detail


def test_reserve_detail_sums_segments_by_stream_and_reads_the_fragmentation_peak():
    segments = [
        {"stream": 0, "total_size": 3 * GIB},
        {"stream": 0, "total_size": GIB // 2},
        {"stream": 94016, "total_size": GIB // 4},  # a side stream's pool
    ]
    cuda = SimpleNamespace(memory_snapshot=lambda: segments)
    stats = {"inactive_split_bytes.all.peak": GIB // 8, "num_alloc_retries": 0}
    detail = _reserve_detail(SimpleNamespace(cuda=cuda), stats)
    assert detail == {"peak_inactive_split_gib": 0.125, "reserved_by_stream_gib": {"0": 3.5, "94016": 0.25}}


def test_reserve_detail_without_segments():
    cuda = SimpleNamespace(memory_snapshot=lambda: [])
    assert _reserve_detail(SimpleNamespace(cuda=cuda), {}) == {"peak_inactive_split_gib": 0.0, "reserved_by_stream_gib": {}}
