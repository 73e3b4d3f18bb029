import json

import numpy as np
import pytest

from resilient_ep.apps.cli import main


def test_plan_json(capsys):
    assert main(["plan", "--experts", "64", "--ranks", "16", "--slots-per-rank", "8", "--nodes", "4",
                 "--failures", "1,2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep["survival"]) == {"1", "2"} and set(rep["baseline"]["survival"]) == {"1", "2"}
    assert 0 < rep["balancedness"] <= 1
    assert rep["survival"]["1"] == 1.0, "every expert has two replicas on distinct ranks"
    assert rep["node_failure_survival"] == 1.0


def test_plan_with_load_file(tmp_path, capsys):
    f = tmp_path / "load.npy"
    np.save(f, np.random.default_rng(0).zipf(1.5, 32).astype(float))
    assert main(["plan", "--experts", "32", "--ranks", "8", "--slots-per-rank", "5", "--load", str(f),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["load"] == "file"


@pytest.mark.parametrize("args, fragment", [
    pytest.param(["--experts", "100", "--ranks", "4", "--slots-per-rank", "2"], "exceed", id="E_gt_RS"),
    pytest.param(["--experts", "8", "--ranks", "4", "--slots-per-rank", "2", "--failures", "4"],
                 "must be in [0, ranks=4)", id="failures_ge_R"),
    pytest.param(["--experts", "8", "--ranks", "4", "--slots-per-rank", "2", "--failures", "a"],
                 "--failures", id="failures_not_int"),
])
def test_plan_errors(args, fragment, capsys):
    assert main(["plan", *args]) == 2
    assert fragment in capsys.readouterr().err


def test_plan_malformed_load(tmp_path, capsys):
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    assert main(["plan", "--experts", "8", "--ranks", "4", "--slots-per-rank", "2", "--load", str(bad)]) == 2
    assert "not a readable .npy" in capsys.readouterr().err
    wrong = tmp_path / "wrong.npy"
    np.save(wrong, np.ones(5))
    assert main(["plan", "--experts", "8", "--ranks", "4", "--slots-per-rank", "2", "--load", str(wrong)]) == 2
    assert "shape [5]" in capsys.readouterr().err


def test_a_missing_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """``pip install resilient-ep`` without the runtime extra: ``make-model`` says which extra
    to install, in one line, instead of a traceback."""
    import builtins

    from resilient_ep.apps.cli import main

    real = builtins.__import__

    def no_tokenizers(name, *args, **kw):
        if name.split(".")[0] in ("tokenizers", "safetensors"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    assert main(["make-model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'resilient-ep[runtime]'" in err[0], err
