"""labkit.bench: worker output parsing, real measurements in subprocesses, skips, and linear memory scaling."""

import json

import pytest

from labkit import bench


def test_parse_worker_output_takes_the_last_result_line():
    stdout = "\n".join([
        "some library noise",
        bench.RESULT_MARKER + json.dumps({"status": "ok", "time_s": 1.0}),
        bench.RESULT_MARKER + json.dumps({"status": "ok", "time_s": 2.0, "peak_extra_mib": 3.5}),
        "trailing noise",
    ])
    assert bench.parse_worker_output(stdout) == {"status": "ok", "time_s": 2.0, "peak_extra_mib": 3.5}
    assert bench.parse_worker_output("no marker here\n") is None
    assert bench.parse_worker_output(bench.RESULT_MARKER + "{not json") is None


def test_flops_and_round_trip():
    shape = bench.Shape(batch=2, heads=4, seq_len=1024, head_dim=64)
    assert bench.attention_flops(shape) == 4 * 2 * 4 * 1024 * 1024 * 64
    both = bench.Shape(2, 4, 1024, 64, causal=True, backward=True)
    assert bench.attention_flops(both) == pytest.approx(bench.attention_flops(shape) * 2.5 / 2)
    m = bench.Measurement("dense", 256, time_s=0.5, times_s=[0.5], gflops=1.0, peak_extra_mib=2.0)
    assert bench.Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


def test_tiny_real_measurement_in_a_subprocess():
    m = bench.measure("dense", 256, heads=2, head_dim=16, repeats=2, timeout_s=120)
    assert m.status == "ok", m.message
    assert m.time_s > 0 and len(m.times_s) == 2 and m.gflops > 0
    assert m.peak_extra_mib >= 0
    text = bench.table([m])
    assert "dense" in text and "1.00x" in text


def test_absurd_length_is_skipped_with_need_and_available():
    m = bench.measure("dense", 10_000_000)
    assert m.status == "skipped"
    assert m.need_mib > m.available_mib
    assert "needs" in m.message and "available" in m.message


def test_unknown_implementation_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        bench.measure("no_such_attention", 16)


def test_missing_optional_dependency_is_skipped(monkeypatch):
    fake = bench.Implementation("needs a module that does not exist", bench._make_dense, bench._dense_memory,
                                requires=("labkit_module_that_does_not_exist",))
    monkeypatch.setitem(bench.IMPLEMENTATIONS, "fake", fake)
    m = bench.measure("fake", 16)
    assert m.status == "skipped" and "not importable" in m.message


def test_memory_efficient_peak_memory_grows_linearly():
    # 4x the length: dense's score matrix grows 16x, the chunked version's running sums only ~4x.
    small, large = (bench.measure("memory_efficient", n, heads=4, head_dim=64, repeats=1, warmup=1, timeout_s=120,
                                  query_chunk_size=256, key_chunk_size=256) for n in (2048, 8192))
    assert small.status == large.status == "ok", (small.message, large.message)
    ratio = large.peak_extra_mib / max(small.peak_extra_mib, 1.0)
    # 8192 x 8192 x 4 heads of float32 would be 1 GiB: even the larger point stays far below it.
    assert large.peak_extra_mib < 200, large.peak_extra_mib
    assert ratio < 8, (small.peak_extra_mib, large.peak_extra_mib)


def test_cli_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = bench.main(["--impl", "dense,memory_efficient", "--seq", "128", "--heads", "2", "--head-dim", "16",
                       "--repeats", "1", "--causal", "--json", str(out_json), "--plot", str(out_png)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "memory_efficient" in printed and "causal" in printed
    rows = json.loads(out_json.read_text())
    assert [r["impl"] for r in rows] == ["dense", "memory_efficient"] and all(r["status"] == "ok" for r in rows)
    assert out_png.stat().st_size > 1000
