"""skipkernels reproduce: the four protocols end to end on tiny datasets, resume after a kill,
shards sharing one folder, failures recorded, and the tables' numbers checked by hand."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reproduce_data
from skipkernels.cli import main
from skipkernels.reproduce import tables
from skipkernels.reproduce.protocols import PROTOCOLS, Run, parse_shard, plan

QUICK = ["--model", "skipkernels-tiny-shapes", "--epochs", "1", "--shots", "2", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return reproduce_data.write_datasets(tmp_path_factory.mktemp("datasets"), variants=True)


def _cli(*argv, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "skipkernels", "reproduce", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_all_four_protocols_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["reproduce", "--protocol", "base2new,fewshot,cross,dg", "--data", str(data),
                 "--datasets", "caltech101,dtd,imagenetv2,imagenet_sketch,imagenet_a,imagenet_r",
                 "--seeds", "1,2", "--modes", "skip,zero-shot", "--out", str(out), "--compare-paper", *QUICK])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert json.loads(printed.splitlines()[-2]) == {"done": 24, "skipped": 0, "held": 0, "failed": 0}
    for name in ("table.md", "table.csv", "summary.json", "base2new.png", "fewshot.png", "cross.png", "dg.png"):
        assert (out / name).is_file(), name
    table = (out / "table.md").read_text()
    for title in ("Base-to-new generalization", "Few-shot learning", "Cross-dataset generalization",
                  "Domain generalization", "Skip Tuning (paper) | 85.04 | 77.53 | 81.11",
                  "| Caltech101 | Skip Tuning (paper) | 98.50 | 95.33 | 96.89 |", "| Skip Tuning (paper) | 72.77 |",
                  # what ran (--epochs 1), then the protocol's own settings and their source
                  "Settings of these runs (from their results.json): model skipkernels-tiny-shapes; 1 epoch; lr 2e-5 "
                  "(image tower 5e-6), 1 warm-up epoch at 1e-6; batch 4; 2 shots per class; seeds 1, 2",
                  "The protocol's own settings: 20 epochs, lr 2e-5 (image tower 5e-6), 1 warm-up epoch at 1e-6, from "
                  "the reference code's configs/trainers/SkipTuning/vit_b16_bs4.yaml", "get a quarter of the epochs",
                  "| **Average (all 11 datasets)** | Skip Tuning (paper) | 85.04 |",
                  "| **Average (2 datasets)** | Skip Tuning (paper) | 91.13 | 81.28 | 85.93 |"):
        assert title in table
    for column in ("Source: ImageNet", "-V2", "-Sketch", "-A", "-R", "Average (all 4 targets)"):
        assert f"| {column} |" in table or f" {column} |" in table
    summary = json.loads((out / "summary.json").read_text())
    runs = [r for part in summary["protocols"].values() for r in part["runs"]]
    assert len(runs) == 24 and all(r["status"] == "done" for r in runs)
    dg = [r for r in runs if r["protocol"] == "dg"]
    assert all(set(r["targets"]) == {"imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"} for r in dg)
    # Each DG target was scored on its own class names (the 4 ImageNet classes the tiny sets hold).
    assert all(r["targets"]["imagenet_a"]["classes"] == 4 for r in dg)
    # Every cell of table.csv is one of table.md's, with the same mean.
    for row in _rows(out / "table.csv"):
        if row["status"] == "ok" and "(paper)" not in row["method"]:
            assert f"{float(row['mean']):.2f}" in table
    # A rerun finds everything finished and trains nothing.
    code = main(["reproduce", "--protocol", "base2new,fewshot,cross,dg", "--data", str(data),
                 "--datasets", "caltech101,dtd,imagenetv2,imagenet_sketch,imagenet_a,imagenet_r",
                 "--seeds", "1,2", "--modes", "skip,zero-shot", "--out", str(out), *QUICK])
    assert code == 0 and json.loads(capsys.readouterr().out.splitlines()[-2])["skipped"] == 24


def _finished(out):
    return sorted(str(p.parent.relative_to(out)) for p in Path(out).glob("*/*/seed*/shots*/*/results.json")
                  if json.loads(p.read_text()).get("finished"))


@pytest.mark.slow
def test_resume_after_a_kill_reruns_nothing_finished_and_gives_the_same_table(data, tmp_path):
    args = ["--protocol", "base2new", "--data", str(data), "--datasets", "caltech101,dtd", "--seeds", "1,2",
            "--modes", "skip,ft", *QUICK[:-1], "--epochs", "2"]
    reference = tmp_path / "uninterrupted"
    assert _cli(*args, "--no-progress", "--out", str(reference)).returncode == 0

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "skipkernels", "reproduce", *args, "--no-progress", "--out",
                             str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_finished(out)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {key: (out / key / "results.json").read_bytes() for key in _finished(out)}
    assert 2 <= len(before) < 8, f"the kill came too late to test resuming: {sorted(before)}"

    rerun = _cli(*args, "--no-progress", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    counts = json.loads(rerun.stdout.splitlines()[-2])
    assert counts["skipped"] == len(before) and counts["done"] == 8 - len(before)
    for key, content in before.items():
        assert (out / key / "results.json").read_bytes() == content, f"{key} was trained again"
    assert len(_finished(out)) == 8
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(_rows(out / "table.csv")) == strip(_rows(reference / "table.csv"))


@pytest.mark.slow
def test_two_shards_at_once_run_disjoint_runs_whose_union_is_the_sweep(data, tmp_path):
    out = tmp_path / "shared"
    args = ["--protocol", "fewshot", "--data", str(data), "--datasets", "caltech101,dtd", "--seeds", "1,2",
            "--modes", "skip,zero-shot", "--out", str(out), *QUICK]
    procs = [subprocess.Popen([sys.executable, "-m", "skipkernels", "reproduce", *args, "--shard", f"{k}/2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outputs]
    trained = []
    for printed, _ in outputs:  # one line per run, "[n/N] key: result"
        trained.append({line.split("] ", 1)[1].split(":")[0] for line in printed.splitlines() if line.startswith("[")})
    assert trained[0] and trained[1] and not trained[0] & trained[1]
    every = {r.key for r in plan("fewshot", ("caltech101", "dtd"), (1, 2), (2,), ("skip", "zero-shot"))}
    assert trained[0] | trained[1] == every
    assert set(_finished(out)) == every
    # The same sweep started twice at once: each run is trained by one of them only.
    again = tmp_path / "twice"
    args[args.index(str(out))] = str(again)
    procs = [subprocess.Popen([sys.executable, "-m", "skipkernels", "reproduce", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    done = [{line.split("] ", 1)[1].split(":")[0] for line in printed.splitlines()
             if line.startswith("[") and "held by another process" not in line} for printed, _ in outputs]
    assert not done[0] & done[1] and done[0] | done[1] == every


@pytest.mark.slow
def test_a_missing_dataset_is_recorded_as_failed_and_the_sweep_goes_on(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["reproduce", "--protocol", "base2new", "--data", str(data), "--datasets", "caltech101,eurosat",
            "--seeds", "1", "--modes", "zero-shot", "--out", str(out), *QUICK]
    assert main(argv + ["--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"dataset eurosat: {data / 'eurosat'} (MISSING: dataset folder not found" in printed
    assert "1 dataset(s) missing or malformed" in printed and "base2new/eurosat/seed1/shots2/zero-shot" in printed
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "failed: base2new/eurosat/seed1/shots2/zero-shot: DatasetError: dataset folder not found" in captured.err
    table = (out / "table.md").read_text()
    assert "| EuroSAT | CLIP (zero-shot) | failed | failed | failed |" in table
    assert "| Caltech101 | CLIP (zero-shot) | 100.00 |" in table
    assert json.loads((out / "base2new/eurosat/seed1/shots2/zero-shot/failed.json").read_text())["error"]


def _result(out, protocol, dataset, seed, mode, accuracy, targets=None, shots=16):
    folder = out / protocol / dataset / f"seed{seed}" / f"shots{shots}" / mode
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps({"finished": True, "accuracy": accuracy,
                                                     "time_s": {"train": 1.0}, "peak_train_memory_mb": 2.0}))
    run = Run(protocol, dataset, seed, shots, mode, tuple(targets or ()))
    (folder / "sweep_run.json").write_text(json.dumps({"run": {"targets": list(run.targets)}}))
    if targets:
        (folder / "transfer.json").write_text(json.dumps({t: {"accuracy": a} for t, a in targets.items()}))


def _cell(summary, protocol, row, method, column):
    rows = summary["protocols"][protocol]["rows"]
    (found,) = [r for r in rows if r["row"] == row and r["method"] == method]
    return found["cells"][column]


def test_table_numbers_by_hand(tmp_path):
    out = tmp_path
    for seed, (a_base, a_new, b_base, b_new) in {1: (80, 70, 90, 60), 2: (82, 74, 86, 62)}.items():
        _result(out, "base2new", "caltech101", seed, "skip", {"base": a_base, "new": a_new})
        _result(out, "base2new", "dtd", seed, "skip", {"base": b_base, "new": b_new})
    for shots, (a, b) in {1: (50, 70), 4: (60, 90)}.items():
        _result(out, "fewshot", "caltech101", 1, "skip", {"all": a}, shots=shots)
        _result(out, "fewshot", "dtd", 1, "skip", {"all": b}, shots=shots)
    _result(out, "cross", "imagenet", 1, "skip", {"all": 70}, {"caltech101": 90, "dtd": 40})
    _result(out, "cross", "imagenet", 2, "skip", {"all": 72}, {"caltech101": 92, "dtd": 44})
    summary = tables.build(out)

    caltech = {c: _cell(summary, "base2new", "Caltech101", "Skip Tuning", c) for c in ("Base", "New", "HM")}
    assert (caltech["Base"]["mean"], caltech["Base"]["std"]) == (81, 1)
    assert (caltech["New"]["mean"], caltech["New"]["std"]) == (72, 2)
    assert caltech["HM"]["mean"] == pytest.approx(2 * 81 * 72 / (81 + 72))  # HM of the means
    hm1, hm2 = 2 * 80 * 70 / 150, 2 * 82 * 74 / 156
    assert caltech["HM"]["std"] == pytest.approx(abs(hm1 - hm2) / 2)  # population std of the per-seed HMs
    average = {c: _cell(summary, "base2new", "Average (2 datasets)", "Skip Tuning", c) for c in ("Base", "New", "HM")}
    assert average["Base"]["mean"] == pytest.approx((81 + 88) / 2)  # mean of the datasets' means
    assert average["New"]["mean"] == pytest.approx((72 + 61) / 2)
    assert average["HM"]["mean"] == pytest.approx(2 * 84.5 * 66.5 / (84.5 + 66.5))  # as the paper's Table 1
    assert average["Base"]["std"] == pytest.approx(0.5)  # per-seed averages 85 and 84

    assert _cell(summary, "fewshot", "Average (2 datasets)", "Skip Tuning", "1 shot")["mean"] == 60
    assert _cell(summary, "fewshot", "Average (2 datasets)", "Skip Tuning", "4 shots")["mean"] == 75
    assert _cell(summary, "fewshot", "DTD", "Skip Tuning", "4 shots")["mean"] == 90

    assert _cell(summary, "cross", "Skip Tuning", "Skip Tuning", "Source: ImageNet")["mean"] == 71
    assert _cell(summary, "cross", "Skip Tuning", "Skip Tuning", "Caltech101")["mean"] == 91
    average = _cell(summary, "cross", "Skip Tuning", "Skip Tuning", "Average (2 targets)")
    assert average["mean"] == pytest.approx((91 + 42) / 2) and average["std"] == pytest.approx(1.5)  # 65 and 68

    md = tables.markdown(summary)
    assert "| Caltech101 | Skip Tuning | 81.00 ± 1.00 | 72.00 ± 2.00 |" in md
    tables.write(out, plots=False)
    assert any(r["row"] == "Average (2 datasets)" and r["column"] == "HM" for r in _rows(out / "table.csv"))
    assert main(["reproduce", "--tables-only", "--out", str(out)]) == 0


def test_plan_and_flags():
    runs = plan("cross", None, (1, 2, 3), None, ("skip",))
    assert len(runs) == 3 and all(r.dataset == "imagenet" and len(r.targets) == 10 for r in runs)
    assert len(plan("fewshot", None, (1, 2, 3), None, ("skip", "coop"))) == 11 * 5 * 3 * 2
    assert PROTOCOLS["dg"].datasets == ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "x", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


@pytest.mark.parametrize("argv,message", [
    (["--data", "."], "--protocol is required"),
    (["--protocol", "base2new"], "--data is required"),
    (["--protocol", "basetonew", "--data", "."], "--protocol must be among"),
    (["--protocol", "base2new", "--data", ".", "--shard", "2/2"], "--shard must be K/N"),
    (["--protocol", "base2new", "--data", ".", "--modes", "skip,magic"], "--modes: 'magic' is not a method"),
    (["--protocol", "base2new", "--data", ".", "--seeds", "1,x"], "--seeds: 'x' is not an integer"),
    (["--protocol", "base2new", "--data", ".", "--shots", "0"], "--shots must be >= 1"),
    (["--protocol", "dg", "--data", ".", "--datasets", "caltech101"], "none of caltech101 belongs to dg"),
    (["--tables-only", "--out", "no-such-sweep"], "no sweep folder there"),
])
def test_bad_flags_fail_with_a_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", *argv]) == 2
    assert message in capsys.readouterr().err


def test_shipped_paper_numbers_are_consistent():
    """A transcription check of paper_numbers.json: each HM is the HM of its base and new, and the
    per-dataset rows average to the paper's average row (both to the paper's rounding)."""
    from skipkernels.reproduce.protocols import ELEVEN
    from skipkernels.train.evaluate import harmonic_mean
    numbers = tables.paper_numbers()
    assert "2412.11509" in numbers["source"]
    per = numbers["base2new"]["datasets"]
    assert set(per) == set(ELEVEN)
    # The one value the source misprints, with the value its own HM and average imply.
    assert list(numbers["misprints"]) == ["base2new/caltech101/CoOp/new"]
    implied = {("caltech101", "CoOp", "new"): 89.81}
    for method in ("Skip Tuning", "CoOp"):
        value = {(d, method, k): implied.get((d, method, k), rows[method][k]) for d, rows in per.items()
                 for k in ("base", "new")}
        for dataset, rows in per.items():
            hm = harmonic_mean(value[dataset, method, "base"], value[dataset, method, "new"])
            assert hm == pytest.approx(rows[method]["hm"], abs=0.011), (method, dataset)
        average = numbers["base2new"]["average"][method]
        for key in ("base", "new"):
            assert sum(value[d, method, key] for d in per) / 11 == pytest.approx(average[key], abs=0.011)
        assert harmonic_mean(average["base"], average["new"]) == pytest.approx(average["hm"], abs=0.011)
    assert numbers["cross"]["methods"]["Skip Tuning"] == {"source": 72.77, "average": 67.00}
    assert numbers["dg"]["methods"]["Skip Tuning"] == {"source": 72.77, "average": 61.20}


def test_a_caption_names_a_count_of_classes_as_top_count():
    """A --top-count T run's identity records the older top_ratio T: its caption says top-count."""
    def trained(**skip):
        identity = {f"skip_config.{k}": v for k, v in skip.items()}
        return {"identity": identity, "mode": "skip", "train_config": {}}
    assert "top-count 3" in tables._non_default([trained(top_ratio=3.0)])
    assert "top-count 3 (given as top-ratio 2.5)" in tables._non_default([trained(top_ratio=2.5)])
    assert "top-ratio 0.25" in tables._non_default([trained(top_ratio=0.25)])
