"""labkit.bench: the worker helper, implementations from the registry, real measurements in subprocesses, skips,
memory models, linear memory scaling, the command line and lab 06's checkpoint table."""

import json
import os
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import labkit
from labkit import bench
from labkit.attention import FAMILIES, Problem


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
    problem = Problem(batch=2, heads=4, seq_len=1024, head_dim=64)
    assert bench.attention_flops(problem) == 4 * 2 * 4 * 1024 * 1024 * 64
    both = Problem(2, 1024, 4, 64, causal=True, backward=True)
    assert bench.attention_flops(both) == pytest.approx(bench.attention_flops(problem) * 2.5 / 2)
    m = bench.Measurement("dense", 256, time_s=0.5, times_s=[0.5], gflops=1.0, peak_extra_mib=2.0)
    assert bench.Measurement.from_dict(json.loads(json.dumps(m.to_dict()))) == m


# ---------------------------------------------------------------- the worker helper

def test_worker_returns_the_functions_value_and_its_peak_memory():
    spec = {"a": 1, "b": [1, 2]}
    done = bench.run_in_worker("builtins:dict", spec, timeout_s=120)
    assert done.ok and done.value == spec and done.returncode == 0
    assert done.peak_rss_mib > 10  # an interpreter that imported labkit.bench (and so jax) holds far more


def test_worker_reports_an_exception_a_timeout_and_a_missing_function():
    raised = bench.run_in_worker("json:loads", {"not": "a string"}, timeout_s=120)
    assert not raised.ok and raised.error.startswith("TypeError:") and raised.value is None
    missing = bench.run_in_worker("labkit.bench:no_such_function", {}, timeout_s=120)
    assert missing.error.startswith("AttributeError:")
    slow = bench.run_in_worker("builtins:dict", {}, timeout_s=0.05)  # importing jax alone takes longer
    assert slow.error == "timed out after 0.05 s"


def test_workers_can_run_at_once_with_extra_environment():
    started = [bench.start_worker("os:getenv", "LABKIT_TEST_WORKER", env={"LABKIT_TEST_WORKER": str(i)})
               for i in range(2)]
    assert [bench.finish_worker(p, timeout_s=120).value for p in started] == ["0", "1"]


def test_worker_imports_the_parents_labkit():
    entry = Path(bench.worker.labkit_path_entry())
    assert (entry / "labkit" / "__init__.py").resolve() == Path(labkit.__file__).resolve()
    assert bench.worker.worker_env()["PYTHONPATH"].split(os.pathsep)[0] == str(entry)


# ---------------------------------------------------------------- implementations come from the registry

def test_every_family_is_an_implementation_with_a_growing_positive_memory_model():
    for name, family in FAMILIES.items():
        assert name in bench.IMPLEMENTATIONS, f"family {name} is not a bench implementation"
        impl = bench.IMPLEMENTATIONS[name]
        assert impl.causal == family.causal
        for causal in family.causal:
            for backward in (False, True):
                small, large = (Problem(1, n, 4, 64, causal, backward) for n in (1024, 4096))
                assert 0 < impl.memory(small, {}) < impl.memory(large, {}), (name, causal, backward)
                # The family's own model, with the family's default options.
                assert impl.memory(large, {}) == family.memory(large, family.options), name


def _inputs(seq: int = 64, heads: int = 2, dim: int = 8):
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    return [jax.random.normal(k, (1, seq, heads, dim)) for k in keys]


@pytest.mark.parametrize("name", [*FAMILIES, "linear_chunkwise", "jax"])
def test_each_implementation_computes_attention(name):
    impl, (q, k, v) = bench.IMPLEMENTATIONS[name], _inputs()
    for causal in impl.causal:
        out = np.asarray(impl.make(causal=causal)(q, k, v))
        assert out.shape == v.shape and np.isfinite(out).all(), (name, causal)
        if name in FAMILIES and FAMILIES[name].exact or name == "jax":
            expected = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
            np.testing.assert_allclose(out, expected, atol=1e-5, err_msg=f"{name}, causal={causal}")


def test_linear_chunkwise_is_the_linear_family_in_chunks():
    q, k, v = _inputs(seq=300)
    prefix = bench.IMPLEMENTATIONS["linear"].make(causal=True)(q, k, v)
    chunked = bench.IMPLEMENTATIONS["linear_chunkwise"].make(causal=True)(q, k, v)
    np.testing.assert_allclose(chunked, prefix, atol=2e-5, rtol=1e-4)
    assert bench.IMPLEMENTATIONS["linear_chunkwise"].memory(Problem(1, 4096, 4, 64, causal=True), {}) < \
        bench.IMPLEMENTATIONS["linear"].memory(Problem(1, 4096, 4, 64, causal=True), {})


def test_extra_input_options_reach_the_extra_inputs():
    # Linformer's proj_k sizes its projections (made by the registry's extra_inputs), not an attention option.
    q, k, v = _inputs(seq=64)
    small = bench.IMPLEMENTATIONS["linformer"].make(causal=False, proj_k=4)(q, k, v)
    full = bench.IMPLEMENTATIONS["linformer"].make(causal=False, proj_k=64)(q, k, v)
    assert small.shape == full.shape and not np.allclose(small, full)
    p = Problem(1, 4096, 4, 64)
    assert bench.IMPLEMENTATIONS["linformer"].memory(p, {"proj_k": 64}) < bench.IMPLEMENTATIONS["linformer"].memory(p, {})


# ---------------------------------------------------------------- measurements

def _probe_workers(specs: list[dict], calls: int) -> list:
    """Start tests/turn_probe.py workers taking turns; return what each sent back (a WorkerResult)."""
    from labkit.bench.turns import TurnTaker
    from labkit.bench.worker import finish_worker, start_worker, worker_env

    turns = TurnTaker(len(specs))
    env = {"PYTHONPATH": os.pathsep.join([worker_env()["PYTHONPATH"], str(Path(__file__).resolve().parent)])}
    workers = [start_worker("turn_probe:record_calls", {**spec, "calls": calls, "turn_fds": turns.worker_fds(i)},
                            env=env, pass_fds=turns.worker_fds(i)) for i, spec in enumerate(specs)]
    turns.close_worker_ends()
    turns.run(calls, timeout_s=60)
    return [finish_worker(worker, timeout_s=60) for worker in workers]


def test_workers_taking_turns_may_print_more_than_a_pipe_holds():
    started = time.monotonic()
    results = _probe_workers([{"chatty": 200_000}, {"chatty": 200_000}], calls=3)
    assert all(r.ok for r in results), [r.error for r in results]
    assert time.monotonic() - started < 50  # a blocked worker would hold its turn until the 60 s timeout


def test_workers_taking_turns_never_overlap_and_rotate_who_goes_first():
    results = _probe_workers([{}, {}], calls=4)
    assert all(r.ok for r in results), [r.error for r in results]
    calls = sorted((start, end, worker) for worker, r in enumerate(results) for start, end in r.value)
    assert len(calls) == 8
    assert all(end <= next_start for (_, end, _), (next_start, _, _) in zip(calls, calls[1:])), calls
    assert [worker for _, _, worker in calls] == [0, 1, 1, 0, 0, 1, 1, 0]


def test_a_worker_that_fails_is_passed_over():
    failed, fine = _probe_workers([{"fail": True}, {}], calls=3)
    assert not failed.ok and "fails before its first turn" in failed.error
    assert fine.ok and len(fine.value) == 3


def test_measure_together_measures_each_implementation_in_its_own_worker():
    points = bench.measure_together(["dense", "memory_efficient"], 256, heads=2, head_dim=16, repeats=2,
                                    timeout_s=120)
    assert [m.impl for m in points] == ["dense", "memory_efficient"]
    for m in points:
        assert m.status == "ok", m.message
        assert len(m.times_s) == 2 and m.steady_extra_mib >= m.peak_extra_mib >= 0 and m.need_mib > 0


def test_tiny_real_measurement_in_a_subprocess():
    m = bench.measure("dense", 256, heads=2, head_dim=16, repeats=2, timeout_s=120)
    assert m.status == "ok", m.message
    assert m.time_s > 0 and len(m.times_s) == 2 and m.gflops > 0
    assert m.peak_extra_mib >= 0 and m.memory_method in ("VmHWM", "ru_maxrss")
    assert m.steady_extra_mib >= m.peak_extra_mib  # every call's high-water mark includes the first call's
    text = bench.table([m])
    assert "dense" in text and "1.00x" in text


def test_a_point_that_raises_is_failed_with_the_error():
    m = bench.measure("dense", 64, heads=1, head_dim=8, repeats=1, timeout_s=120, no_such_option=1)
    assert m.status == "failed" and "TypeError" in m.message and "no_such_option" in m.message


def test_absurd_length_is_skipped_with_need_and_available():
    m = bench.measure("dense", 10_000_000)
    assert m.status == "skipped"
    assert m.need_mib > m.available_mib
    assert "needs" in m.message and "available" in m.message


def test_a_causal_form_the_family_lacks_is_skipped():
    m = bench.measure("linformer", 64, causal=True)
    assert m.status == "skipped" and "no causal form" in m.message


def test_unknown_implementation_is_a_value_error():
    with pytest.raises(ValueError, match="impl must be one of"):
        bench.measure("no_such_attention", 16)


def test_missing_optional_dependency_is_skipped(monkeypatch):
    dense = bench.IMPLEMENTATIONS["dense"]
    fake = bench.Implementation("needs a module that does not exist", dense.make, dense.memory,
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


def test_cli_rejects_an_unknown_implementation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--impl", "dense,nope", "--seq", "16"])
    assert exit_info.value.code == 2 and "unknown --impl nope" in capsys.readouterr().err


def test_cli_ratios_refer_to_dense_then_torch_then_the_first_implementation(capsys):
    from labkit.bench.cli import _baseline

    assert _baseline(None, ["memory_efficient", "dense", "torch"]) == "dense"
    assert _baseline(None, ["memory_efficient", "torch"]) == "torch"
    assert _baseline(None, ["linear", "memory_efficient"]) == "linear"
    assert _baseline("memory_efficient", ["linear", "memory_efficient"]) == "memory_efficient"
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--impl", "memory_efficient,linear", "--baseline", "torch", "--seq", "16"])
    assert exit_info.value.code == 2 and "--baseline torch is not among" in capsys.readouterr().err


def test_linformer_checkpoint_table_measures_each_level_in_a_worker():
    rows = bench.checkpoint_memory_table(("C0", "C2"), batch=1, seq=256, d_model=32, heads=2, head_dim=16,
                                         proj_k=32, depth=2, timeout_s=300)
    assert [r["level"] for r in rows] == ["C0", "C2"]
    for row in rows:
        assert "error" not in row, row
        assert row["peak_extra_mib"] >= 0 and row["method"] in ("VmHWM", "ru_maxrss") and row["seq"] == 256


# ---------------------------------------------------------------- --all-variants ratios, --tune

def test_ratio_table_has_one_column_per_variant_and_notes_a_missing_baseline():
    points = [bench.Measurement(impl, 4096, causal=c, backward=b, time_s=t)
              for impl, scale in (("memory_efficient", 3.0), ("torch", 2.0))
              for c, b, t in ((False, False, 1.0), (True, False, 0.5), (False, True, 4.0), (True, True, 2.0))
              for t in [t * scale]]
    text = bench.tables.ratio_table(points, baseline="torch")
    header, row = text.splitlines()
    assert header.split("|")[0].endswith("forward ") and "causal, fwd+bwd" in header.split("|")[-1]
    assert row.startswith("memory_eff   4096") and row.count("1.50x") == 4
    skipped = [bench.Measurement("torch", 64, status="skipped", message="torch is not importable")]
    assert "(torch not measured: torch is not importable)" in bench.tables.ratio_table(
        [bench.Measurement("dense", 64, time_s=1.0)] + skipped, baseline="torch")


def test_tune_caches_the_fastest_chunk_sizes_for_this_cpu(tmp_path, monkeypatch):
    from labkit.attention.chunked import chunk_sizes_for
    from labkit.bench import tune

    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    tuned = tune.tune([64], heads=1, head_dim=8, candidates=((16, 16), (32, 64), (128, 128)), rounds=1)
    times = tuned["times_s"][64]
    assert set(times) == {"16x16", "32x64", "64x64"}  # a candidate longer than the sequence is clipped to it
    assert all(t > 0 for t in times.values())
    best = tuple(int(x) for x in min(times, key=times.get).split("x"))
    assert json.loads(Path(tuned["path"]).read_text()) == {next(iter(tuned["chosen"])): list(best)}
    assert chunk_sizes_for(64, 64, 8) == best
    assert "seq     64" in tune.report(tuned) and str(tmp_path) in tune.report(tuned)


def test_an_option_named_impl_colon_name_goes_to_that_implementation_only():
    from labkit.bench.measuring import options_for

    options = {"query_chunk_size": 256, "memory_efficient:devices": 2, "torch:enable_gqa": False}
    assert options_for("memory_efficient", options) == {"query_chunk_size": 256, "devices": 2}
    assert options_for("torch", options) == {"query_chunk_size": 256, "enable_gqa": False}
    assert options_for("dense", options) == {"query_chunk_size": 256}


def test_a_point_with_devices_runs_its_worker_with_that_many_cpu_devices():
    spread, plain = (bench.measure("memory_efficient", 256, heads=4, head_dim=16, repeats=1, timeout_s=300,
                                   **options) for options in ({"memory_efficient:devices": 2}, {}))
    assert spread.status == plain.status == "ok", (spread.message, plain.message)
    assert spread.options == {"devices": 2} and plain.options == {}
    failed = bench.measure("memory_efficient", 256, heads=3, head_dim=16, repeats=1, timeout_s=300, devices=2)
    assert failed.status == "failed" and "3 heads cannot be split evenly over 2 devices" in failed.message
