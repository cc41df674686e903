"""``top_count``: CSkip's K given as a count, K = min(top_count, C, max_top). It keeps exactly the
classes of the older spelling, ``top_ratio`` above 1 (which still works, with a FutureWarning,
and is one run with it: a folder trained under either resumes under the other). Setting both,
or a count that is no integer >= 1, is a one-line ValueError."""
import copy
import json
import types
import warnings

import pytest

from conftest import tiny_clip
from skipkernels.cli import _configs, build_parser, main
from skipkernels.ops.class_select import top_k_for
from skipkernels.ops.policy import KernelPolicy
from skipkernels.options import identity_values
from skipkernels.reproduce.protocols import Run
from skipkernels.reproduce.sweep import Sweep, differences, settings_of
from skipkernels.skip.paper import PaperSkipTuning
from skipkernels.skip.tuner import SkipConfig, SkipTuner
from skipkernels.train import run_folder
from skipkernels.train.checkpoint import CheckpointError
from skipkernels.train.trainer import TrainConfig

COUNT_WARNING = "above 1 is a count of classes: use top_count"


def _config(**fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return SkipConfig(**fields)


@pytest.mark.parametrize("num_classes", [1, 2, 7, 12, 100])
@pytest.mark.parametrize("max_top", [1, 5, 50])
@pytest.mark.parametrize("count", [2, 3, 5, 11, 12, 30, 60])
def test_top_count_keeps_as_many_classes_as_the_older_spelling(num_classes, max_top, count):
    k = top_k_for(num_classes, 0.5, max_top, top_count=count)
    assert k == top_k_for(num_classes, float(count), max_top) == min(count, num_classes, max_top)


def test_a_count_of_one_keeps_one_class_where_top_ratio_one_keeps_them_all():
    assert top_k_for(12, 0.5, 50, top_count=1) == 1
    assert top_k_for(12, 1.0, 50) == 12


def test_the_older_spelling_warns_and_names_the_new_one():
    with pytest.warns(FutureWarning, match=f"top_ratio=5 {COUNT_WARNING}=5"):
        SkipConfig(top_ratio=5)
    with pytest.warns(FutureWarning, match=f"top_ratio=2.5 {COUNT_WARNING}=3"):
        SkipConfig(top_ratio=2.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SkipConfig(top_count=5)
        SkipConfig(top_ratio=1.0)
        SkipConfig(top_ratio=0.25)


@pytest.mark.parametrize("fields, message", [
    (dict(top_count=5, top_ratio=0.25), "top_count=5 and top_ratio=0.25 both give CSkip's K"),
    (dict(top_count=5, top_ratio=5), "both give CSkip's K"),
    (dict(top_count=0), "top_count must be an integer >= 1"),
    (dict(top_count=-3), "top_count must be an integer >= 1"),
    (dict(top_count=2.5), "top_count must be an integer >= 1"),
    (dict(top_count="5"), "top_count must be an integer >= 1"),
    (dict(top_count=True), "top_count must be an integer >= 1"),
])
def test_bad_counts_are_clear_value_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        SkipConfig(**fields)
    with pytest.raises(ValueError, match="top_count must be an integer >= 1"):
        top_k_for(12, 0.5, 50, top_count=0)


def test_the_paper_step_counts_alike(tokenizer):
    names = [f"class {i}" for i in range(12)]
    model = tiny_clip(layers=2)
    for count in (1, 3, 8):
        own = PaperSkipTuning(copy.deepcopy(model), names, tokenizer, skip_layers=1, top_count=count, max_top=5,
                              seed=5)
        assert own.top_k == min(count, 5)
        if count > 1:
            older = PaperSkipTuning(copy.deepcopy(model), names, tokenizer, skip_layers=1, top_ratio=count,
                                    max_top=5, seed=5)
            assert older.top_k == own.top_k and older.rank_mask.tolist() == own.rank_mask.tolist()


def test_the_tuner_selects_the_same_classes_under_either_spelling(tokenizer):
    names = [f"class {i}" for i in range(12)]
    model = tiny_clip(layers=2)
    count = SkipTuner(copy.deepcopy(model), names, tokenizer, SkipConfig(skip_layers=1, top_count=3), seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the tuner rebuilds its config
        older = SkipTuner(copy.deepcopy(model), names, tokenizer, SkipConfig(skip_layers=1, top_ratio=3), seed=5)
    assert count.skipper.top_k == older.skipper.top_k == 3
    assert count.skipper.rank_mask.tolist() == older.skipper.rank_mask.tolist()


# ---------------------------------------------------------------- one run under either spelling
def test_both_spellings_are_one_identity():
    assert identity_values(_config(top_count=5)) == identity_values(_config(top_ratio=5))
    assert identity_values(_config(top_count=5)) != identity_values(_config(top_count=4))
    # a count of one has no older spelling: top_ratio=1.0 keeps every class
    assert identity_values(_config(top_count=1)) != identity_values(_config(top_ratio=1.0))
    # the default config records what it recorded before top_count existed
    assert "top_count" not in identity_values(SkipConfig())


def _identity(skip):
    item = types.SimpleNamespace(path="/data/a.png", label=0, classname="a")
    return run_folder.run_identity(model="skipkernels-tiny", pretrained=None, model_seed=0, tokenizer=None,
                                   data_root="/data", dataset="d", base_to_new=True, train_items=[item],
                                   test_groups={"base": ([item], ["a"])}, skip=skip, train=TrainConfig(),
                                   policy=KernelPolicy(), autocast_dtype=None, world_size=1)


def test_a_folder_trained_with_top_ratio_5_resumes_under_top_count_5(tmp_path):
    stored = _identity(_config(top_ratio=5))
    stored.pop("skip_config.top_count", None)  # as a version before top_count wrote it
    (tmp_path / "results.json").write_text(json.dumps({"finished": False, "identity": stored}))
    assert run_folder.check(tmp_path, _identity(_config(top_count=5))) is None
    assert run_folder.check(tmp_path, _identity(_config(top_ratio=5))) is None
    with pytest.raises(CheckpointError, match="skip_config.top_ratio: 5 there, 4.0 now"):
        run_folder.check(tmp_path, _identity(_config(top_count=4)))


def test_a_sweep_run_recorded_with_top_ratio_5_is_the_same_run_under_top_count_5(tmp_path):
    run = Run("base2new", "dtd", 1, 16, "skip")

    def spec(skip):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # each run's config is rebuilt from the sweep's
            return Sweep(tmp_path, tmp_path, "skipkernels-tiny", None, None, skip, TrainConfig()).spec(run)
    older = spec(_config(top_ratio=5))
    older["skip_config"].pop("top_count", None)  # as a version before top_count wrote it
    assert differences(settings_of(older, True), settings_of(spec(_config(top_count=5)), True)) == []
    assert differences(settings_of(spec(SkipConfig()), True), settings_of(spec(_config(top_count=1)), True)) == \
        ["skip_config.top_count: '(not recorded)' there, 1 now"]


# ---------------------------------------------------------------- the command line
def test_the_flag_sets_the_field():
    args = build_parser().parse_args(["finetune", "--top-count", "5"])
    assert _configs(args)[0].top_count == 5


def test_the_older_flag_says_so_in_one_line(capsys):
    args = build_parser().parse_args(["finetune", "--top-ratio", "5"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        skip = _configs(args)[0]
        SkipConfig(top_ratio=5)  # a config the run rebuilds: no second message
    assert skip.top_ratio == 5 and skip.top_count is None
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    err = capsys.readouterr().err
    assert err == "skipkernels finetune: note: --top-ratio 5 above 1 is a count of classes: use --top-count 5, " \
                  "which keeps the same classes\n"


@pytest.mark.parametrize("flags, message", [
    (["--top-count", "5", "--top-ratio", "0.25"], "top_count=5 and top_ratio=0.25 both give CSkip's K"),
    (["--top-count", "0"], "top_count must be an integer >= 1"),
])
def test_bad_count_flags_are_one_line(flags, message, capsys):
    assert main(["finetune", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"skipkernels finetune: error: {message}") and err.count("\n") == 1
