"""The public names live at the top level, in the style of peft and open_clip."""
import subprocess
import sys

import skipkernels

PUBLIC = ("patch_clip", "unpatch_clip", "SkipTuner", "SkipConfig", "finetune", "TrainConfig", "apply_pet",
          "PetHandle", "pet_config", "VLPETConfig", "AdapterConfig", "LoRAConfig", "load_classifier", "predict",
          "KernelPolicy", "use_policy", "use_backend", "info", "__version__")


def test_every_public_name_is_at_the_top_level_and_listed():
    for name in PUBLIC:
        assert name in skipkernels.__all__, name
        assert getattr(skipkernels, name) is not None, name
    assert set(PUBLIC) <= set(dir(skipkernels))


def test_the_top_level_names_are_the_defining_objects():
    from skipkernels.pet import apply_pet
    from skipkernels.prediction import load_classifier, predict
    from skipkernels.train.job import finetune
    from skipkernels.train.trainer import TrainConfig
    assert skipkernels.finetune is finetune and skipkernels.TrainConfig is TrainConfig
    assert skipkernels.apply_pet is apply_pet and skipkernels.load_classifier is load_classifier
    assert skipkernels.predict is predict


def test_a_submodule_import_does_not_shadow_a_public_function():
    import skipkernels.prediction  # noqa: F401
    assert callable(skipkernels.predict) and skipkernels.predict.__name__ == "predict"


def test_a_bare_import_stays_light():
    code = ("import sys, skipkernels; heavy = [m for m in ('open_clip', 'skipkernels.train.trainer', "
            "'skipkernels.skip.tuner') if m in sys.modules]; print(heavy); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
