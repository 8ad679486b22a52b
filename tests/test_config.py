import pytest
import yaml

from cloudmask.config import RULES, load_config
from cloudmask.config import schema as config_lib
from cloudmask.errors import ConfigError


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def test_every_default_has_a_rule_and_every_rule_a_default():
    assert set(_flat(config_lib._defaults())) == set(RULES)


def test_defaults_are_the_reference_values():
    cfg = load_config()
    assert cfg.seed == 1234
    assert (cfg.train.batch_size, cfg.train.learning_rate, cfg.train.epochs) == (32, 0.001, 1)
    assert (cfg.image.patch_size, cfg.image.overlap, cfg.image.height, cfg.image.width) == (256, 80, 1200, 1500)
    assert (cfg.data.normalisation, cfg.data.train_split, cfg.data.split_seed) == ("fixed", 0.8, 42)
    assert cfg.train.early_stopping.restore_best_weights is False
    assert cfg.deviations() == {}


def test_dotted_overrides_are_typed():
    cfg = load_config(overrides=["train.epochs=5", "train.learning_rate=2e-3", "data.skip_bad=true",
                                 "data.root=/tmp/x", "infer.max_files=null"])
    assert cfg.train.epochs == 5 and cfg["train.learning_rate"] == 0.002
    assert cfg.data.skip_bad is True and cfg.data.root == "/tmp/x" and cfg.infer.max_files is None
    assert set(cfg.deviations()) == {"train.learning_rate"}


def test_a_bare_off_is_the_word_off(tmp_path):
    # YAML 1.1 reads `off` as false: `--set output.progress=off` (what infer -q passes) and a file's `progress: off`
    # both mean the choice "off"
    path = tmp_path / "c.yaml"
    path.write_text("output:\n  progress: off\ndata:\n  cache: off\n")
    from_file = load_config(str(path))
    assert (from_file.output.progress, from_file.data.cache) == ("off", "off")
    assert load_config(overrides=["output.progress=off"]).output.progress == "off"
    assert load_config(overrides=["data.cache=off"]).data.cache == "off"
    assert "cache: 'off'" in load_config(overrides=["data.cache=off"]).to_yaml()  # saved as the word


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "train.epoch"),                 # unknown key, named
    ("train.batch_size=0", "train.batch_size"),       # out of range
    ("train.batch_size=abc", "train.batch_size"),     # wrong type
    ("data.normalisation=minmax", "data.normalisation"),
    ("data.train_split=1.0", "data.train_split"),
    ("image.overlap=81", "image.overlap"),            # must be even
    ("image.patch_size=100", "image.patch_size"),     # not divisible by 2**depth
    ("train=3", "train"),                             # a section given a value
    ("seed", "seed"),                                 # not key=value
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value)


def test_config_file_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  batch_size: 16\n")
    cfg = load_config(str(path), ["train.epochs=9"])
    assert (cfg.train.epochs, cfg.train.batch_size) == (9, 16)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epocs: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(path) in str(err.value) and "train.epocs" in str(err.value) and "train.epochs" in str(err.value)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config("no-such-preset")


def test_reference_flat_config_is_mapped_with_notes(tmp_path):
    reference = {
        "benchmark": "CloudMask", "organisation": "STFC", "division": "SciML", "status": "research",
        "platform": "nvidia gtx-2", "accelerators_per_node": 16,
        "train_dir": "~/sciml_bench/datasets/cloud_slstr_ds1/one-day",
        "inference_dir": "~/sciml_bench/datasets/cloud_slstr_ds1/ssts",
        "model_file": "~/m.h5", "output_dir": "~/out", "log_file": "./cloudMask_Log",
        "mlperf_logfile": "./mlperf_cloudmask.log", "PATCH_SIZE": 256, "IMAGE_H": 1200, "IMAGE_W": 1500,
        "N_CHANNELS": 9, "MIN_SST": 273.15, "CROP_SIZE": 80, "seed": 1234, "learning_rate": 0.001, "epochs": 1,
        "batch_size": 32, "train_split": 0.8, "clip_offset": 15, "no_cache": False, "nodes": 1, "gpu": 1,
    }
    path = tmp_path / "cloudMaskConfig.yaml"
    path.write_text(yaml.safe_dump(reference))
    cfg = load_config(str(path))
    assert cfg.data.train_dir.endswith("one-day") and cfg.data.test_dir.endswith("ssts")
    assert cfg.mlperf.org == "STFC" and cfg.mlperf.platform == "nvidia gtx-2"
    assert cfg.mlperf.division == "auto"  # "SciML" is not an MLPerf division
    notes = " ".join(cfg.notes)
    for key in ("division", "no_cache", "clip_offset", "MIN_SST", "model_file", "nodes"):
        assert key in notes
    assert cfg.deviations() == {}


def test_reference_config_with_unsupported_channel_count(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("PATCH_SIZE: 256\nN_CHANNELS: 3\n")
    with pytest.raises(ConfigError, match="N_CHANNELS"):
        load_config(str(path))


def test_presets_are_valid():
    for name in config_lib.preset_names():
        load_config(name)


def test_config_round_trips_through_yaml():
    cfg = load_config(overrides=["train.epochs=3"])
    again = config_lib.config_from_dict(yaml.safe_load(cfg.to_yaml()), "x")
    assert again.to_dict() == cfg.to_dict() and again.sha256() == cfg.sha256()


def test_compute_options_and_learning_rate_scaling():
    from cloudmask.config import load_config

    cfg = load_config(overrides=["train.batch_size=128", "train.lr_scaling=linear"])
    assert cfg.effective_learning_rate == pytest.approx(0.004)
    assert load_config(overrides=["train.batch_size=128", "train.lr_scaling=sqrt"]).effective_learning_rate == \
        pytest.approx(0.002)
    assert load_config().effective_learning_rate == 0.001
    dev = load_config(overrides=["train.precision=mixed_bfloat16", "train.lr_scaling=sqrt"]).deviations()
    assert set(dev) == {"train.precision", "train.lr_scaling"}
    assert not load_config(overrides=["train.jit_compile=true"]).deviations()  # XLA is not a deviation


def test_gradient_accumulation_and_mirrored_replicas_are_refused_up_front():
    with pytest.raises(ConfigError, match="micro_batch_size=8 .gradient accumulation. does not work"):
        load_config(overrides=["distribute.strategy=mirrored", "train.micro_batch_size=8"])
    with pytest.raises(ConfigError, match="distribute.cpu_devices=1"):
        load_config(overrides=["distribute.cpu_devices=1"])
