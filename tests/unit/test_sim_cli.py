"""``resilient-ep simulate``: table, JSON, PNG, errors; and the 1024-rank hour budget."""

from __future__ import annotations

import json
import time

from resilient_ep.sim.cli import main

SMALL = """seed: 2
ranks: 16
duration_s: 200
failures: [{time_s: 60, rank: 1, kind: crash}]
"""

FIELDS = {"goodput", "stall_s", "reintegration_pause_s", "time_to_95pct_s", "requests_lost",
          "recomputed_tokens", "availability"}


def test_json_and_plot(tmp_path, capsys):
    sc = tmp_path / "small.yaml"
    sc.write_text(SMALL)
    png = tmp_path / "out" / "g.png"
    assert main([str(sc), "--json", "--plot", str(png)]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert list(obj["policies"]) == ["full_restart", "mask_and_repair", "shadow_kv",
                                     "resilient_ep"]
    for p in obj["policies"].values():
        assert FIELDS <= set(p)
        assert len(p["stall_s"]) == 1
        assert len(p["goodput"]["t_s"]) == len(p["goodput"]["tokens_per_s"]) == 200
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table(tmp_path, capsys):
    sc = tmp_path / "small.yaml"
    sc.write_text(SMALL)
    assert main([str(sc), "--policy", "full_restart", "--policy", "resilient_ep"]) == 0
    out = capsys.readouterr().out
    assert "full_restart" in out and "resilient_ep" in out and "shadow_kv" not in out
    assert "stall_s" in out and "availability" in out


def test_bad_file_exits_2_naming_the_key(tmp_path, capsys):
    sc = tmp_path / "bad.yaml"
    sc.write_text(SMALL + "workload: {prompt_len: 5}\n")
    assert main([str(sc)]) == 2
    err = capsys.readouterr().err
    assert "workload.prompt_len: unknown key" in err


def test_1024_ranks_for_an_hour_in_under_a_minute(tmp_path, capsys):
    sc = tmp_path / "big.yaml"
    sc.write_text("""seed: 3
ranks: 1024
duration_s: 3600
failures: [{time_s: 600, rank: 17, kind: crash}, {time_s: 1500, rank: 400, kind: hang}]
generated: {rank_mtbf_h: 200, node_mtbf_h: 400, node_repair_s: 900}
""")
    t0 = time.perf_counter()
    assert main([str(sc), "--json"]) == 0
    elapsed = time.perf_counter() - t0
    obj = json.loads(capsys.readouterr().out)
    assert elapsed < 60.0, f"{elapsed:.1f} s"
    n = len(obj["policies"]["resilient_ep"]["stall_s"])
    assert n >= 3, "generated failures should add to the two in the trace"


def test_set_overrides_keys_and_names_bad_ones(tmp_path, capsys):
    sc = tmp_path / "small.yaml"
    sc.write_text(SMALL)
    args = [str(sc), "--json", "--policy", "mask_and_repair"]
    assert main(args) == 0
    base = json.loads(capsys.readouterr().out)["policies"]["mask_and_repair"]
    assert main(args + ["--set", "policies.mask_and_repair.reintegration_pause_s=2",
                        "--set", "detection.crash_s=5"]) == 0
    over = json.loads(capsys.readouterr().out)["policies"]["mask_and_repair"]
    assert base["reintegration_pause_s"] == 8.0 and over["reintegration_pause_s"] == 2.0
    # 4.5 s more detection, plus the prefill of the larger backlog before the first token.
    assert 4.5 <= over["stall_s"][0] - base["stall_s"][0] < 5.5
    assert main([str(sc), "--set", "detection.crash_ms=5"]) == 2
    assert "detection.crash_ms: unknown key" in capsys.readouterr().err
    assert main([str(sc), "--set", "nope.x=1"]) == 2
    assert "nope: unknown section" in capsys.readouterr().err
