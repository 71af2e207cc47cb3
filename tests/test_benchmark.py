"""`jaxserve bench` and `jaxserve report` on a tiny model and workload; the roofline arithmetic."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import ROOT, random_prompts
from jaxserve import cli
from jaxserve.benchmark import matmul_params, roofline, run_grid
from jaxserve.config import ModelConfig
from jaxserve.make_model import SIZES, hf_config


def test_roofline_matches_hand_computation():
    cfg = ModelConfig.from_hf(hf_config("llama", "56m"))
    # 56m: hidden 512, intermediate 1408, 8 layers, 8 heads, 4 KV heads, head_dim 64, vocab 32000.
    per_layer = 512 * 64 * (2 * 8 + 2 * 4) + 3 * 512 * 1408  # q,o: 512x512; k,v: 512x256; MLP 3x
    assert per_layer == 786_432 + 2_162_688
    assert matmul_params(cfg) == (8 * per_layer, 512 * 32000)
    rl = roofline(cfg, prompt_tokens=100, output_tokens=11, steps=11, kv_token_reads=1055,
                  seconds=2.0, dtype_bytes=4, peaks=(1e12, 1e10))
    flops = 2 * 8 * per_layer * 110 + 2 * 512 * 32000 * 11 + 4 * 64 * 8 * 8 * 1055
    moved = 11 * (8 * per_layer + 512 * 32000) * 4 + 1055 * 2 * 8 * 4 * 64 * 4
    assert rl.flops == flops
    assert rl.bytes == moved
    assert rl.achieved_flop_s == flops / 2.0
    assert rl.fraction == pytest.approx(max(flops / 2.0 / 1e12, moved / 2.0 / 1e10))


def test_size_configs_match_make_model():
    with open(os.path.join(ROOT, "configs", "models", "sizes.yaml")) as f:
        assert yaml.safe_load(f) == SIZES


def test_make_model_writes_a_bfloat16_checkpoint(tmp_path):
    """``jaxserve make-model --dtype bfloat16``: the float32 checkpoint's random weights rounded to bf16 and
    stored so (as most Hugging Face checkpoints are); config.json says so."""
    import ml_dtypes
    from safetensors.numpy import load_file

    for dtype in ("float32", "bfloat16"):
        assert cli.main(["make-model", str(tmp_path / dtype), "--dtype", dtype]) == 0
    f32 = load_file(str(tmp_path / "float32" / "model.safetensors"))
    b16 = load_file(str(tmp_path / "bfloat16" / "model.safetensors"))
    assert f32.keys() == b16.keys()
    for name, w in f32.items():
        assert w.dtype == "float32" and b16[name].dtype == ml_dtypes.bfloat16, name
        assert (b16[name] == w.astype(ml_dtypes.bfloat16)).all(), name
    with open(tmp_path / "bfloat16" / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        from jaxserve.make_model import make_model
        make_model(str(tmp_path / "x"), dtype="float16")


def _tiny_workload(tmp_path) -> str:
    prompts = random_prompts([5, 30, 12, 50, 3, 20], seed=9)
    workload = {"name": "tiny-6", "vocab_size": 1024,
                "requests": [{"prompt_token_ids": p, "max_tokens": n} for p, n in zip(prompts, [4, 9, 2, 6, 12, 3])]}
    wl_path = tmp_path / "tiny.json"
    wl_path.write_text(json.dumps(workload))
    return str(wl_path)


def test_bench_and_report(llama_dir, tmp_path, capsys):
    wl_path = _tiny_workload(tmp_path)
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({"model": llama_dir, "workload": str(wl_path), "modes": ["continuous", "static"],
                                      "max_num_seqs": [4], "dtype": ["float32"],
                                      "max_num_batched_tokens": 32, "max_model_len": 128}))
    results = tmp_path / "results"
    assert cli.main(["bench", "--config", str(config), "--out", str(results), "--no-progress"]) == 0
    files = list(results.glob("*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    # (One slot count: each run is a process of its own that compiles its buckets; the grid over slot
    # counts is the same loop, and test_failed_run_does_not_stop_the_grid runs two of them.)
    assert {(r["mode"], r["max_num_seqs"]) for r in records} == {("continuous", 4), ("static", 4)}
    for r in records:
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["workload"] == "tiny-6"
        assert r["output_tokens"] == 36 and r["requests"] == 6
        assert r["tok_s"] > 0 and r["seconds"] > 0 and r["compiles"] >= 1 and r["warmup_s"] >= 0
        assert set(r["ttft_ms"]) == {"p50", "p90", "p99"} and set(r["tpot_ms"]) == {"p50", "p90", "p99"}
        assert r["flops"] > 0 and r["bytes"] > 0 and 0 < r["roofline_fraction"]
        assert r["peak_tflop_s"] > 0 and r["peak_gb_s"] > 0 and r["peak_host_rss_mb"] > 0
        assert r["jax_version"] and r["model_params"] > 0
    # A record "from another machine", to check that the report merges devices.
    other = dict(records[0], device="TPU v5e", tok_s=records[0]["tok_s"] * 10, roofline_fraction=0.5)
    (results / "tpu.jsonl").write_text(json.dumps(other) + "\n")
    report_dir = tmp_path / "report"
    assert cli.main(["report", str(results), "--out", str(report_dir), "--price", "TPU v5e=1.2"]) == 0
    md = (report_dir / "report.md").read_text()
    for name in ("tok_s_vs_max_num_seqs.png", "latency_percentiles.png", "continuous_vs_static.png"):
        assert (report_dir / name).stat().st_size > 1000
        assert f"]({name})" in md
    table = [line for line in md.splitlines() if line.startswith("| cpu |") or line.startswith("| TPU v5e |")]
    assert len([t for t in table if t.count("|") == 15]) == 3  # 2 cpu runs + 1 TPU run in the throughput table
    speedups = [line for line in md.splitlines() if line.startswith("| cpu |") and line.endswith("x |")]
    assert len(speedups) == 1  # continuous vs static at max_num_seqs 4
    tpu_row = next(t for t in table if t.startswith("| TPU v5e |"))
    cost = 1.2 / 3600 / other["tok_s"] * 1e6
    assert f"{cost:.3f}" in tpu_row and "50.0%" in tpu_row


def test_failed_run_does_not_stop_the_grid(llama_dir, tmp_path):
    # max_num_seqs=0 is refused by the engine in its run's process; the other run still writes its record.
    results = tmp_path / "results"
    with pytest.raises(RuntimeError, match=r"1 of 2 bench runs failed.*continuous max_num_seqs=0 float32"):
        run_grid(llama_dir, _tiny_workload(tmp_path), modes=["continuous"], max_num_seqs=[0, 2], dtypes=["float32"],
                 out_dir=str(results), max_num_batched_tokens=32, max_model_len=128, progress=False)
    (records_file,) = results.glob("*.jsonl")
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert [(r["mode"], r["max_num_seqs"], r["output_tokens"]) for r in records] == [("continuous", 2, 36)]


def _bench_script(name: str):
    """``bench/<name>.py`` loaded as a module (the bench scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_script", os.path.join(ROOT, "bench", f"{name}.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_roofline_script_per_step_floor(llama_dir, tmp_path, capsys):
    """bench/roofline.py: every step timed and given its floor; the floors add up to the run's."""
    script = _bench_script("roofline")
    argv = ["--model", llama_dir, "--workload", _tiny_workload(tmp_path), "--max-num-seqs", "4",
            "--max-num-batched-tokens", "32", "--max-model-len", "128", "--peak-gflops", "100", "--read-gbs", "10"]
    assert script.main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["output_tokens"] == 36 and out["peak_gflops"] == 100 and out["read_gbs"] == 10
    assert sum(b["steps"] for b in out["buckets"].values()) == out["steps"] > 0
    assert out["floor_s"] == pytest.approx(out["matmuls_floor_s"] + out["attention_floor_s"], abs=2e-3)
    assert out["floor_s"] == pytest.approx(sum(b["floor_s"] for b in out["buckets"].values()), abs=0.01)
    assert out["efficiency"] == pytest.approx(out["floor_s"] / out["step_s"], abs=2e-3)
    assert out["matmuls_floor_s"] > 0 and out["attention_floor_s"] > 0 and 0 < out["efficiency"]
    assert out["mode"] == "continuous"
    # --mode static: the same requests in fixed batches, so more steps, each floored by the rows it really has
    assert script.main(argv + ["--mode", "static"]) == 0
    static = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert static["mode"] == "static" and static["output_tokens"] == 36
    assert static["steps"] > out["steps"]
    assert static["floor_s"] == pytest.approx(static["matmuls_floor_s"] + static["attention_floor_s"], abs=2e-3)


def test_compare_vllm_decode_step_fields(monkeypatch, capsys):
    """bench/compare_vllm.py --static: each mode's decode-only step time and the ratio without prompt work,
    from the two runs' step counters (the runs themselves are stubbed: this checks the arithmetic)."""
    script = _bench_script("compare_vllm")
    common = {"attention_impl": "cpu", "matmul_impl": "cpu", "layer_impl": "fused", "output_tokens": 100, "seconds": 1.0, "warmup_s": 0.0,
              "compiles": 3, "buckets": 3, "host_prepare_s": 0.0, "process_s": 1.0}
    runs = {"continuous": dict(common, tok_s=300.0, steps=100, prefill_steps=20, device_step_s=2.0,
                               prefill_device_s=0.8),
            "static": dict(common, tok_s=100.0, steps=340, prefill_steps=10, device_step_s=4.3,
                           prefill_device_s=0.7)}
    monkeypatch.setattr(script, "run_json", lambda cmd, prefix, env=None: runs[cmd[cmd.index("--mode") + 1]])
    assert script.main(["--model", "m", "--workload", "w.json", "--max-num-seqs", "8", "--static", "--skip-vllm"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["continuous_over_static"] == 3.0
    assert out["jaxserve"]["decode_step_ms"] == 15.0  # (2.0 - 0.8) s over 80 steps
    assert out["jaxserve_static"]["decode_step_ms"] == pytest.approx(3.6 / 330 * 1e3, abs=1e-3)
    # static's 3.6 s of decode-only steps against continuous's 100 steps at 15 ms
    assert out["continuous_over_static_without_prompts"] == 2.4
    assert "vllm" not in out


def test_compare_vllm_rounds_report_the_median_round(monkeypatch, capsys, tmp_path):
    """bench/compare_vllm.py --rounds 3: the engines alternate three times; the record is the round with the
    median headline ratio (continuous/static with --static, else jaxserve/vLLM), with every round's figures
    and each ratio's median (runs stubbed)."""
    script = _bench_script("compare_vllm")
    common = {"attention_impl": "cpu", "matmul_impl": "cpu", "layer_impl": "fused", "output_tokens": 100, "seconds": 1.0, "warmup_s": 0.0,
              "compiles": 3, "buckets": 3, "host_prepare_s": 0.0, "process_s": 1.0, "steps": 100,
              "prefill_steps": 20, "device_step_s": 2.0, "prefill_device_s": 0.8}
    # (continuous, static, vLLM) tok/s per round, in the order the script asks for them
    figures = iter([300.0, 100.0, 200.0, 330.0, 100.0, 200.0, 310.0, 110.0, 250.0])
    calls = []

    def run_json(cmd, prefix, env=None):
        calls.append("vllm" if "--mode" not in cmd else cmd[cmd.index("--mode") + 1])
        return dict(common, tok_s=next(figures))

    monkeypatch.setattr(script, "run_json", run_json)
    vllm_python = tmp_path / "python"
    vllm_python.write_text("")
    assert script.main(["--model", "m", "--workload", "w.json", "--static", "--rounds", "3",
                        "--vllm-python", str(vllm_python)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == ["continuous", "static", "vllm"] * 3
    assert [r["jaxserve_over_vllm"] for r in out["rounds"]] == [1.5, 1.65, 1.24]
    assert [r["continuous_over_static"] for r in out["rounds"]] == [3.0, 3.3, 2.818]
    assert out["round_of_median"] == 1 and out["continuous_over_static"] == 3.0 and out["jaxserve"]["tok_s"] == 300.0
    assert out["median"] == {"jaxserve_over_vllm": 1.5, "continuous_over_static": 3.0, "jaxserve_tok_s": 310.0}
    # without --static the jaxserve/vLLM ratio heads: round 3 (1.24) < round 1 (1.5) < round 2 (1.65)
    figures = iter([300.0, 200.0, 330.0, 200.0, 310.0, 250.0])
    calls.clear()
    assert script.main(["--model", "m", "--workload", "w.json", "--rounds", "3",
                        "--vllm-python", str(vllm_python)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert calls == ["continuous", "vllm"] * 3
    assert out["round_of_median"] == 1 and out["median"] == {"jaxserve_over_vllm": 1.5, "jaxserve_tok_s": 310.0}
    with pytest.raises(SystemExit):
        script.main(["--model", "m", "--workload", "w.json", "--rounds", "0", "--skip-vllm"])
