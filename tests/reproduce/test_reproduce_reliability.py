"""skipkernels reproduce tells the truth: table captions state the settings that ran, a sweep's
folder is never reused under other settings without saying so, the paper's rows sit only beside
what they compare with, shots a dataset cannot give are refused before training, and --help shows
each protocol's own defaults. Real sweeps use the tiny datasets and the shipped tiny model for 1-2
epochs; the table checks write run folders by hand."""
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

import pytest

import reproduce_data
from skipkernels.cli import build_parser, main
from skipkernels.ops.policy import KernelPolicy
from skipkernels.options import identity_fields
from skipkernels.reproduce import command, sweep as sw, tables
from skipkernels.reproduce.protocols import ELEVEN, PROTOCOLS, Run
from skipkernels.skip.tuner import SkipConfig
from skipkernels.train.evaluate import harmonic_mean
from skipkernels.train.trainer import TrainConfig

TINY = ["--model", "skipkernels-tiny-shapes", "--seeds", "1", "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return reproduce_data.write_datasets(tmp_path_factory.mktemp("datasets"))


def _counts(printed: str) -> dict:
    return json.loads([line for line in printed.splitlines() if line.startswith("{")][-1])


def _section(table: str, title: str) -> str:
    return table.split(f"## {title}")[1].split("\n## ")[0]


# ------------------------------------------------------------------ 1: captions state what ran
@pytest.mark.slow
def test_each_tables_caption_states_the_settings_that_ran_also_with_tables_only(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["reproduce", "--protocol", "base2new,fewshot,cross", "--data", str(data), "--datasets", "caltech101",
            "--modes", "skip", "--shots", "2", "--epochs", "2", "--lr", "3e-3", "--out", str(out), *TINY]
    assert main(argv) == 0, capsys.readouterr().err
    table = (out / "table.md").read_text()
    expected = {  # protocol's title: (what ran, the protocol's own settings)
        "Base-to-new generalization": ("2 epochs; lr 0.003 (image tower 5e-6), 1 warm-up epoch at 1e-6; batch 4",
                                       "20 epochs, lr 2e-5 (image tower 5e-6), 1 warm-up epoch at 1e-6"),
        "Few-shot learning": ("2 epochs; lr 0.003 (image tower 1e-5), no warm-up; batch 4",
                              "40 epochs, lr 1e-5 for both towers, no warm-up"),
        # the ImageNet source: a quarter of 2 epochs is at least 1
        "Cross-dataset generalization": ("1 epoch; lr 0.003 (image tower 1e-6), 1 warm-up epoch at 1e-8; batch 4",
                                         "20 epochs, lr 1e-5 (image tower 1e-6), 1 warm-up epoch at 1e-8"),
    }
    for title, (ran, own) in expected.items():
        section = _section(table, title)
        assert f"Settings of these runs (from their results.json): model skipkernels-tiny-shapes; {ran}" in section
        assert f"The protocol's own settings: {own}, from the reference code's" in section
        assert "different settings" not in section
    assert "Settings: 20 epochs" not in table and "Settings: 40 epochs" not in table
    # --tables-only reads the same from the runs
    before = table
    (out / "table.md").unlink()
    assert main(["reproduce", "--tables-only", "--out", str(out)]) == 0
    assert (out / "table.md").read_text() == before


def _write_run(out, protocol, dataset, seed, mode, accuracy, shots=16, targets=None, model="tiny", **train):
    """A finished run's folder as the sweep writes it: sweep_run.json, results.json (with the
    train_config and identity a trained run records), transfer.json."""
    folder = out / protocol / dataset / f"seed{seed}" / f"shots{shots}" / mode
    folder.mkdir(parents=True)
    config = TrainConfig(**{**PROTOCOLS[protocol].train, "shots": shots, "seed": seed, **train})
    skip = SkipConfig(mode="ft" if mode == "zero-shot" else mode)
    trained = {f"train_config.{f.name}": getattr(config, f.name) for f in identity_fields(TrainConfig)}
    trained.update({f"skip_config.{f.name}": getattr(skip, f.name) for f in identity_fields(SkipConfig)})
    results = {"finished": True, "accuracy": accuracy, "model": model, "time_s": {"train": 1.0},
               "peak_train_memory_mb": 2.0}
    if mode != "zero-shot":
        results.update(train_config=dataclasses.asdict(config), identity={"model": model, **trained})
    (folder / "results.json").write_text(json.dumps(results))
    run = {"protocol": protocol, "dataset": dataset, "seed": seed, "shots": shots, "mode": mode,
           "targets": list(targets or ())}
    spec = {"run": run, "model": model, "skip_config": {k.split(".", 1)[1]: v for k, v in trained.items()
                                                         if k.startswith("skip_config.")},
            "train_config": {k.split(".", 1)[1]: v for k, v in trained.items() if k.startswith("train_config.")}}
    (folder / "sweep_run.json").write_text(json.dumps(spec))
    if targets:
        (folder / "transfer.json").write_text(json.dumps({t: {"accuracy": a} for t, a in targets.items()}))
    return folder


@pytest.mark.parametrize("second,caption", [
    ({}, "1 epoch; lr 2e-5 (image tower 5e-6)"),  # same settings: one description, nothing differs
    ({"lr": 3e-3}, "learning rates that differ between runs (below)"),
    ({"epochs": 3}, "epochs 3 (DTD), 1 (Caltech101)"),  # per dataset: stated, not a difference
])
def test_a_caption_names_every_setting_its_runs_differ_in(tmp_path, second, caption):
    _write_run(tmp_path, "base2new", "caltech101", 1, "skip", {"base": 80, "new": 70}, epochs=1)
    _write_run(tmp_path, "base2new", "dtd", 1, "skip", {"base": 60, "new": 50}, **{"epochs": 1, **second})
    md = tables.markdown(tables.build(tmp_path))
    assert caption in md
    if "lr" in second:
        assert ("**The runs of this table ran under different settings**: train_config.lr: 2e-05 in 1 run "
                "(base2new/caltech101/seed1/shots16/skip); 0.003 in 1 run (base2new/dtd/seed1/shots16/skip). "
                "Its averages mix them.") in md
    else:
        assert "different settings" not in md


def test_a_cell_with_fewer_seeds_than_its_table_says_so(tmp_path):
    for seed, base in ((1, 80), (2, 82)):
        _write_run(tmp_path, "base2new", "caltech101", seed, "skip", {"base": base, "new": 70})
    _write_run(tmp_path, "base2new", "dtd", 1, "skip", {"base": 60, "new": 50})
    md = tables.markdown(tables.build(tmp_path))
    assert "| Caltech101 | Skip Tuning | 81.00 ± 1.00 | 70.00 ± 0.00 |" in md
    assert "| DTD | Skip Tuning | 60.00 (seeds: 1 of 2) | 50.00 (seeds: 1 of 2) |" in md
    assert "| **Average (2 datasets)** | Skip Tuning | 70.50 (seeds: 1 of 2) |" in md  # std over seed 1 only


# ------------------------------------------------------------------ 2: a folder reused under other settings
@pytest.fixture(scope="module")
def finished_sweep(data, tmp_path_factory):
    """A finished base2new sweep (skip and zero-shot on Caltech101, 1 epoch) and its command line."""
    out = tmp_path_factory.mktemp("finished") / "sweep"
    argv = ["reproduce", "--protocol", "base2new", "--data", str(data), "--datasets", "caltech101", "--modes",
            "skip,zero-shot", "--shots", "2", "--epochs", "1", "--out", str(out), *TINY]
    assert main(argv) == 0
    return out, argv


def _copy(finished_sweep, tmp_path):
    out, argv = finished_sweep
    copy = tmp_path / "sweep"
    shutil.copytree(out, copy)
    return copy, [str(copy) if a == str(out) else a for a in argv]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_rerun_with_other_settings_is_refused_until_no_resume_retrains_those_runs(finished_sweep, tmp_path, capsys):
    out, argv = _copy(finished_sweep, tmp_path)
    before = _files(out)
    capsys.readouterr()
    for _ in range(2):  # the same command again tells the same: nothing was done
        assert main(argv + ["--lr", "3e-3"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"skipkernels reproduce: error: --out {out} holds 1 of this sweep's runs made with "
                              "other settings (first: base2new/caltech101/seed1/shots2/skip): train_config.lr: 2e-05 "
                              "there, 0.003 now (1 run). Use --no-resume") and "\n" not in err
        assert _files(out) == before  # refused before any work: not a byte changed
    assert main(argv + ["--lr", "3e-3", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert ("base2new/caltech101/seed1/shots2/skip: 1 epoch, 1 step (its folder holds a run made with other settings: "
            "train_config.lr: 2e-05 there, 0.003 now; --no-resume trains it again)") in plan
    assert "base2new/caltech101/seed1/shots2/zero-shot: 0 epochs, 0 steps (finished: kept)" in plan

    assert main(argv + ["--lr", "3e-3", "--no-resume"]) == 0
    assert _counts(capsys.readouterr().out) == {"done": 1, "skipped": 1, "held": 0, "failed": 0}
    skip = out / "base2new/caltech101/seed1/shots2/skip"
    assert json.loads((skip / "results.json").read_text())["train_config"]["lr"] == 0.003
    assert json.loads((skip / "sweep_run.json").read_text())["train_config"]["lr"] == 0.003
    zero_shot = "base2new/caltech101/seed1/shots2/zero-shot/results.json"  # its result does not depend on lr
    assert (out / zero_shot).read_bytes() == before[Path(zero_shot)]
    assert "lr 0.003 (image tower 5e-6)" in (out / "table.md").read_text()
    assert main(argv + ["--lr", "3e-3"]) == 0
    assert _counts(capsys.readouterr().out) == {"done": 0, "skipped": 2, "held": 0, "failed": 0}
    assert main(argv) == 2  # and now the old settings are the other ones
    assert "train_config.lr: 0.003 there, 2e-05 now" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("with_failed_json", [True, False])
def test_a_folder_whose_results_are_of_other_settings_than_its_record_gives_no_numbers(
        finished_sweep, tmp_path, capsys, with_failed_json):
    """What a rerun under other settings left before: sweep_run.json already naming the new lr,
    results.json still the old run's (and failed.json). Its numbers are not the table's, and a
    rerun under the new settings is refused, naming the difference, rather than skipped."""
    out, argv = _copy(finished_sweep, tmp_path)
    folder = out / "base2new/caltech101/seed1/shots2/skip"
    spec = json.loads((folder / "sweep_run.json").read_text())
    spec["train_config"]["lr"] = 0.003
    (folder / "sweep_run.json").write_text(json.dumps(spec))
    if with_failed_json:
        (folder / "failed.json").write_text(json.dumps({"error": "CheckpointError: holds a run with other settings"}))
    assert main(["reproduce", "--tables-only", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "| Caltech101 | Skip Tuning | failed | failed | failed |" in table
    status = "failed" if with_failed_json else "other settings"
    assert f"| base2new/caltech101/seed1/shots2/skip | {status} |" in table
    assert "| Caltech101 | CLIP (zero-shot) | 100.00 |" in table  # the untouched run still counts
    capsys.readouterr()
    assert main(argv + ["--lr", "3e-3"]) == 2
    assert "train_config.lr: 2e-05 there, 0.003 now" in capsys.readouterr().err


@pytest.mark.slow
def test_shards_run_with_other_settings_into_one_folder_are_named_in_the_caption(data, tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["reproduce", "--protocol", "base2new", "--data", str(data), "--datasets", "caltech101,dtd", "--modes",
            "skip", "--shots", "2", "--epochs", "1", "--out", str(out), *TINY]
    assert main(argv + ["--shard", "0/2"]) == 0
    assert main(argv + ["--shard", "1/2", "--lr", "3e-3"]) == 0  # no run of the other shard is touched
    table = (out / "table.md").read_text()
    assert ("train_config.lr: 2e-05 in 1 run (base2new/caltech101/seed1/shots2/skip); 0.003 in 1 run "
            "(base2new/dtd/seed1/shots2/skip)") in table
    assert "learning rates that differ between runs (below)" in table


def _sweep(tmp_path, **train):
    return sw.Sweep(tmp_path / "data", tmp_path / "out", "tiny", None, None, SkipConfig(),
                    TrainConfig(**train), policy=KernelPolicy())


def _state_folder(sweep, run, results_lr=None, spec_edit=None, finished=True, failed=False, model=True,
                  transfer=None):
    folder = sweep.folder(run)
    folder.mkdir(parents=True)
    spec = sweep.spec(run)
    if spec_edit:
        spec_edit(spec)
    (folder / "sweep_run.json").write_text(json.dumps(spec))
    identity = {"model": spec["model"], "tokenizer": None, "data": spec["data"],
                **{f"train_config.{k}": v for k, v in sweep.spec(run)["train_config"].items()},
                **{f"skip_config.{k}": v for k, v in sweep.spec(run)["skip_config"].items()},
                "kernel_policy.backend": "auto", "kernel_policy.table": None}
    if results_lr is not None:
        identity["train_config.lr"] = results_lr
    (folder / "results.json").write_text(json.dumps({"finished": finished, "identity": identity}))
    if model:
        (folder / "model.pt").write_bytes(b"")
    if failed:
        (folder / "failed.json").write_text("{}")
    if transfer is not None:
        (folder / "transfer.json").write_text(json.dumps(transfer))


SKIP_RUN = Run("base2new", "dtd", 1, 2, "skip")
CROSS_RUN = Run("cross", "imagenet", 1, 2, "zero-shot", ("caltech101", "dtd"))


@pytest.mark.parametrize("run,setup,state,difference", [
    (SKIP_RUN, {}, sw.FINISHED, None),
    (SKIP_RUN, {"finished": False}, sw.UNFINISHED, None),
    (SKIP_RUN, {"model": False}, sw.UNFINISHED, None),
    (SKIP_RUN, {"failed": True}, sw.FAILED, None),
    (SKIP_RUN, {"spec_edit": lambda s: s["train_config"].update(lr=0.5)}, sw.OTHER_SETTINGS,
     "train_config.lr: 0.5 there, 2e-05 now"),
    (SKIP_RUN, {"results_lr": 0.5}, sw.OTHER_SETTINGS, "train_config.lr: 0.5 there, 2e-05 now"),
    # a field an earlier spec recorded that changes no result
    (SKIP_RUN, {"spec_edit": lambda s: s["skip_config"].update(cache_budget_gb=8.0)}, sw.FINISHED, None),
    (SKIP_RUN, {"spec_edit": lambda s: s.update(model="other")}, sw.OTHER_SETTINGS, "model: 'other' there"),
    # zero-shot trains nothing: the learning rate is not its setting
    (CROSS_RUN, {"spec_edit": lambda s: s["train_config"].update(lr=0.5),
                 "transfer": {"caltech101": {"accuracy": 1.0}, "dtd": {"accuracy": 2.0}}}, sw.FINISHED, None),
    (CROSS_RUN, {"spec_edit": lambda s: s["skip_config"].update(template="{}")}, sw.OTHER_SETTINGS,
     "skip_config.template: '{}' there"),
    # more targets than before: the new one is evaluated, the run is not another one
    (CROSS_RUN, {"spec_edit": lambda s: s["run"].update(targets=["caltech101"]),
                 "transfer": {"caltech101": {"accuracy": 1.0}}}, sw.UNFINISHED, None),
])
def test_what_a_runs_folder_holds(tmp_path, run, setup, state, difference):
    sweep = _sweep(tmp_path)
    assert sw.folder_state(sweep, run) == (sw.EMPTY, [])
    _state_folder(sweep, run, **setup)
    found, diffs = sw.folder_state(sweep, run)
    assert found == state
    assert (difference is None and not diffs) or any(d.startswith(difference) for d in diffs), diffs


@pytest.mark.parametrize("setup,replace,found_at_start", [
    # interrupted, same settings: resumes from its checkpoint; with --no-resume starts over
    ({"finished": False}, False, {"checkpoint.pt", "metrics.csv", "results.json"}),
    ({"finished": False}, True, set()),
    ({"finished": False, "failed": True}, True, set()),
    # another run's folder: with --no-resume replaced; without, refused (and its files untouched)
    ({"spec_edit": lambda s: s["train_config"].update(lr=0.5)}, True, set()),
    ({"spec_edit": lambda s: s["train_config"].update(lr=0.5)}, False, None),
])
def test_an_unfinished_or_other_runs_folder_is_resumed_replaced_or_refused(tmp_path, monkeypatch, setup, replace,
                                                                           found_at_start):
    sweep = dataclasses.replace(_sweep(tmp_path), progress=False)
    _state_folder(sweep, SKIP_RUN, model=False, **setup)
    folder = sweep.folder(SKIP_RUN)
    for name in ("checkpoint.pt", "metrics.csv"):
        (folder / name).write_bytes(b"x")
    before = _files(folder)
    seen = []

    def train(sweep_, run, folder_):  # what finetune would find in the folder
        seen.append({p.name for p in folder_.iterdir()} - {"sweep_run.json", "run.lock"})
        return {"finished": True, "accuracy": {"base": 1.0, "new": 1.0}}

    monkeypatch.setattr(sw, "_train", train)
    outcome = sw.run_sweep(sweep, [SKIP_RUN], {}, replace=replace)
    if found_at_start is None:
        assert outcome["failed"][0]["error"].startswith(f"CheckpointError: {folder} holds a run made with other "
                                                        "settings (train_config.lr: 0.5 there, 2e-05 now)")
        assert not seen and _files(folder) == before  # no failed.json written into another run's folder
    else:
        assert seen == [found_at_start] and outcome["done"] == [SKIP_RUN.key]
        assert json.loads((folder / "sweep_run.json").read_text()) == sweep.spec(SKIP_RUN)


# ------------------------------------------------------------------ 3: the paper's rows
def _paper(dataset, method):
    return tables.paper_numbers()["base2new"]["datasets"][dataset][method]


@pytest.mark.parametrize("datasets", [("caltech101", "dtd"), ELEVEN])
def test_the_papers_averages_sit_beside_ours_only_over_the_same_datasets(tmp_path, datasets):
    for d in datasets:
        _write_run(tmp_path, "base2new", d, 1, "skip", {"base": 80, "new": 70})
    summary = tables.build(tmp_path, compare_paper=True)
    md = tables.markdown(summary, compare_paper=True)
    rows = {(r["row"], r["method"]): r for r in summary["protocols"]["base2new"]["rows"]}
    published = tables.paper_numbers()["base2new"]["average"]["Skip Tuning"]
    assert rows["Average (all 11 datasets)", "Skip Tuning (paper)"]["cells"]["HM"]["mean"] == published["hm"]
    if len(datasets) == 11:
        assert ("Average (all 11 datasets)", "Skip Tuning") in rows
        assert not any(row.startswith("Average (") and "all" not in row for row, _ in rows)
    else:
        assert ("Average (2 datasets)", "Skip Tuning") in rows
        for method in ("Skip Tuning", "CoOp"):
            base = statistics.fmean(_paper(d, method)["base"] for d in datasets)
            new = statistics.fmean(_paper(d, method)["new"] for d in datasets)
            cells = rows["Average (2 datasets)", f"{method} (paper)"]["cells"]
            assert cells["Base"]["mean"] == pytest.approx(base) and cells["New"]["mean"] == pytest.approx(new)
            assert cells["HM"]["mean"] == pytest.approx(harmonic_mean(base, new))
        assert "Paper rows \"Average (2 datasets)\": the mean of the paper's per-dataset" in md
        assert "Misprint in the source, base2new/caltech101/CoOp/new" in md


@pytest.mark.parametrize("targets,same_column", [(("caltech101", "dtd"), False), (ELEVEN[1:], True)])
def test_transfer_averages_say_which_targets_they_cover(tmp_path, targets, same_column):
    _write_run(tmp_path, "cross", "imagenet", 1, "skip", {"all": 70}, targets={t: 50 for t in targets})
    summary = tables.build(tmp_path, compare_paper=True)
    rows = {r["row"]: r["cells"] for r in summary["protocols"]["cross"]["rows"]}
    ours = f"Average ({'all 10' if same_column else '2'} targets)"
    assert rows["Skip Tuning"][ours]["mean"] == 50
    paper = rows["Skip Tuning (paper)"]["Average (all 10 targets)"]["mean"]
    assert paper == tables.paper_numbers()["cross"]["methods"]["Skip Tuning"]["average"]
    note = "they are different averages, in separate columns"
    assert (note in tables.markdown(summary, compare_paper=True)) is not same_column


@pytest.mark.parametrize("protocol", ["base2new", "cross"])
def test_runs_of_several_shot_counts_get_a_row_each(tmp_path, protocol):
    for shots, value in ((1, 40), (2, 90)):
        if protocol == "cross":
            _write_run(tmp_path, "cross", "imagenet", 1, "skip", {"all": value}, shots=shots,
                       targets={"caltech101": value})
        else:
            _write_run(tmp_path, "base2new", "dtd", 1, "skip", {"base": value, "new": value}, shots=shots)
    summary = tables.build(tmp_path)
    column = "Caltech101" if protocol == "cross" else "Base"
    found = {r["method"]: r["cells"][column]["mean"] for r in summary["protocols"][protocol]["rows"]
             if r["kind"] != "average"}
    assert found == {"Skip Tuning (1 shot)": 40, "Skip Tuning (2 shots)": 90}
    assert "1, 2 shots per class (a row for each)" in tables.markdown(summary)


@pytest.mark.parametrize("protocol,paper_marks", [
    ("base2new", {"Caltech101": 96.89, "DTD": 74.59}),
    ("cross", {}),  # our 2 targets' average is not the paper's 10: no mark
])
def test_charts_share_one_y_scale_and_mark_only_comparable_paper_numbers(tmp_path, monkeypatch, protocol,
                                                                        paper_marks):
    import skipkernels.plots as plots
    drawn = []
    monkeypatch.setattr(plots, "bar_chart", lambda panels, path, title, **kw: drawn.append((panels, kw)) or True)
    if protocol == "base2new":
        for d in ("caltech101", "dtd"):
            _write_run(tmp_path, "base2new", d, 1, "skip", {"base": 80, "new": 70})
            _write_run(tmp_path, "base2new", d, 1, "zero-shot", {"base": 60, "new": 50})
    else:
        _write_run(tmp_path, "cross", "imagenet", 1, "skip", {"all": 70}, targets={"caltech101": 50, "dtd": 40})
    tables.write(tmp_path, compare_paper=True)
    ((panels, options),) = drawn
    assert options["share_y"] is True
    marks = (options["markers"] or [{}])[0]
    assert {k: v for k, v in marks.items() if k in paper_marks} == paper_marks
    if protocol == "base2new":
        derived = tables.paper_numbers()["base2new"]["datasets"]
        assert marks["Average (2 datasets)"] == pytest.approx(harmonic_mean(
            statistics.fmean(derived[d]["Skip Tuning"]["base"] for d in ("caltech101", "dtd")),
            statistics.fmean(derived[d]["Skip Tuning"]["new"] for d in ("caltech101", "dtd"))))
        assert options["markers"][1] == {}  # the paper has no zero-shot numbers per dataset
    else:
        assert options["markers"] is None


# ------------------------------------------------------------------ 4: shots a dataset cannot give
@pytest.mark.parametrize("protocol,classes", [("base2new", 2), ("fewshot", 4)])
def test_runs_that_cannot_have_their_shots_are_named_by_the_dry_run_and_refused_before_training(
        data, tmp_path, capsys, protocol, classes):
    out = tmp_path / "sweep"
    argv = ["reproduce", "--protocol", protocol, "--data", str(data), "--datasets", "caltech101", "--modes",
            "skip,zero-shot", "--shots", "4", "--epochs", "1", "--out", str(out), *TINY]
    assert main(argv + ["--dry-run"]) == 0
    plan = capsys.readouterr().out
    why = (f"caltech101 has fewer than 4 training images in {classes} of the {classes} classes the run trains on "
           "(fewest: 'red shape' with 2)")
    assert f"{protocol}/caltech101/seed1/shots4/skip: 1 epoch, " in plan and f"(cannot run: {why})" in plan
    assert f"{protocol}/caltech101/seed1/shots4/zero-shot: 0 epochs, 0 steps (to run)" in plan  # draws no shots
    assert "1 run(s) cannot run (above): they would be recorded as failed, before any training" in plan
    assert main(argv + ["--modes", "skip"]) == 1
    assert f"failed: {protocol}/caltech101/seed1/shots4/skip: DatasetError: cannot draw 4 shots: {why}" in \
        capsys.readouterr().err
    folder = out / protocol / "caltech101/seed1/shots4/skip"
    assert sorted(p.name for p in folder.iterdir()) == ["failed.json"]  # nothing trained, nothing loaded


# ------------------------------------------------------------------ failed targets, a rerun adds them
def test_a_failed_target_fails_the_run_and_a_rerun_evaluates_only_that_target(tmp_path, capsys):
    root = tmp_path / "data"
    reproduce_data.imagenet(root)
    reproduce_data.coop_dataset(root, "caltech101")
    out = tmp_path / "sweep"
    argv = ["reproduce", "--protocol", "cross", "--data", str(root), "--datasets", "caltech101,dtd", "--modes",
            "zero-shot", "--shots", "2", "--out", str(out), *TINY]
    assert main(argv) == 1  # not "done": one of its targets has no number
    captured = capsys.readouterr()
    assert _counts(captured.out) == {"done": 0, "skipped": 0, "held": 0, "failed": 1}
    assert "failed: cross/imagenet/seed1/shots2/zero-shot: targets failed: dtd: DatasetError" in captured.err
    table = (out / "table.md").read_text()
    assert "| CLIP (zero-shot) | 25.00 | 100.00 | failed | – |" in table  # what worked is kept
    results = (out / "cross/imagenet/seed1/shots2/zero-shot/results.json").read_bytes()
    fewer = argv.copy()
    fewer[fewer.index("caltech101,dtd")] = "caltech101"  # dtd's old error is not this sweep's: finished
    assert main(fewer) == 0
    assert _counts(capsys.readouterr().out) == {"done": 0, "skipped": 1, "held": 0, "failed": 0}
    reproduce_data.coop_dataset(root, "dtd")
    assert main(argv) == 0
    assert _counts(capsys.readouterr().out)["done"] == 1
    assert (out / "cross/imagenet/seed1/shots2/zero-shot/results.json").read_bytes() == results
    assert "| CLIP (zero-shot) | 25.00 | 100.00 | 100.00 | 100.00 |" in (out / "table.md").read_text()


# ------------------------------------------------------------------ 5: help and the protocols' defaults
def test_help_shows_what_is_required_and_each_protocols_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: skipkernels reproduce --protocol NAME[,NAME...] --data ROOT [--out OUT] [options]\n"
                           "       skipkernels reproduce --tables-only [--out OUT] [--compare-paper]")
    assert "required, except with --tables-only:\n  --protocol" in text
    flat = " ".join(text.split())
    assert "(default: the protocol's: base2new 20, fewshot 40, cross 20, dg 20; a quarter for ImageNet" in flat
    assert "(default: the protocol's: base2new 2e-5, fewshot 1e-5, cross 1e-5, dg 1e-5)" in flat
    assert "default: 20)" not in flat and "default: 2e-05)" not in flat  # finetune's defaults are not shown
    assert "  fewshot   1,2,4,8,16 shots; 40 epochs, lr 1e-5 for both towers, no warm-up" in text
    assert "hf:<folder or hub name>" in flat and "--no-resume" in flat


@pytest.mark.parametrize("flags,epochs,lr", [
    ([], 40, 1e-5),                                # the protocol's
    (["--epochs", "20"], 20, 1e-5),                # finetune's default value, given: it wins
    (["--lr", "2e-5", "--epochs", "3"], 3, 2e-5),
])
def test_a_flag_given_wins_over_the_protocol_even_at_finetunes_default(tmp_path, flags, epochs, lr):
    args = build_parser().parse_args(["reproduce", "--protocol", "fewshot", "--data", str(tmp_path), "--datasets",
                                      "caltech101", "--model", "skipkernels-tiny-shapes", *flags])
    sweep, runs, _ = command.build_sweep(args)
    _, train = sweep.configs(runs[0])
    assert (train.epochs, train.lr, train.lr_image) == (epochs, lr, 1e-5)
