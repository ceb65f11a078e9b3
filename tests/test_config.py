import pytest

from htr_dist.config import Config, ConfigError, describe_keys, from_dict, load_config, save_config, to_dict


def test_defaults_and_seed_keys():
    cfg = load_config()
    assert cfg.arch.cnn_cfg == [[2, 64], "M", "mobilevit1", [3, 128], "M", "mobilevit2", [2, 256]]
    assert cfg.arch.head_type == "both" and cfg.arch.rnn_layers == 3 and cfg.arch.rnn_hidden_size == 256
    assert cfg.train.llm_sample_ratio == 0.125 and cfg.train.use_llm is True


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.01\n  batch_size: 8\narch:\n  rnn_type: gru\n")
    cfg = load_config(str(path), ["train.lr=1e-3", "train.use_llm=false", "arch.cnn_cfg=[[2, 64], 'M', [2, 128]]"])
    assert cfg.train.lr == pytest.approx(1e-3)  # the command line wins over the file
    assert cfg.train.batch_size == 8 and cfg.arch.rnn_type == "gru" and cfg.train.use_llm is False
    assert cfg.arch.cnn_cfg == [[2, 64], "M", [2, 128]]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        ("trian.lr=1", "unknown config key 'trian' (did you mean 'train'?)"),
        ("train.batch_size=-4", "train.batch_size: must be > 0, got -4"),
        ("train.batch_size=abc", "train.batch_size: expected an integer, got 'abc'"),
        ("train.llm_sample_ratio=0", "train.llm_sample_ratio: must be in (0, 1], got 0.0"),
        ("train.llm_sample_ratio=1.5", "train.llm_sample_ratio: must be in (0, 1], got 1.5"),
        ("train.use_llm=maybe", "train.use_llm: expected true or false, got 'maybe'"),
        ("dist.strategy=zero9", "dist.strategy: 'zero9' is not one of"),
        ("arch.cnn_cfg=[[2, 64], 'Q']", "arch.cnn_cfg: bad entry 'Q'"),
        ("arch.cnn_cfg=[[2, 64], mobilevit0]", "'mobilevit0' names MobileViT block 0, but arch.mobilevit_patch_sizes"),
        ("arch.cnn_cfg=[[2, 64], mobilevit3]", "'mobilevit3' names MobileViT block 3, but arch.mobilevit_patch_sizes"),
        ("arch.llm_tap_layer=4", "arch.llm_tap_layer: must be in [1, arch.rnn_layers=3], got 4"),
        ("train.lr", "expected key=value"),
        ("train.lr=nan", "train.lr: expected a finite number, got 'nan'"),
        ("train.lr=inf", "train.lr: expected a finite number, got 'inf'"),
        ("train.llm_loss_weight=nan", "train.llm_loss_weight: expected a finite number, got 'nan'"),
        ("train.weight_decay=.nan", "train.weight_decay: expected a finite number, got nan"),
        ("train.grad_clip=.inf", "train.grad_clip: expected a finite number, got inf"),
        ("train.shortcut_weight=-.inf", "train.shortcut_weight: expected a finite number, got -inf"),
        ("arch.shortcut_weight=1", "'arch.shortcut_weight' is now 'train.shortcut_weight'"),
        ("train.lr=1e400", "train.lr: expected a finite number, got inf"),
        ("run.dir=[1, 2]", "run.dir: expected str, got list [1, 2]"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


@pytest.mark.parametrize("text", ["1e-3", "1E-3", "2e-4", "+2e-4", "1.5e3", "1.0e-3", ".5e-3", "0.001", "3"])
def test_float_reads_alike_from_file_and_override(text, tmp_path):
    """PyYAML follows YAML 1.1, where 1e-3 (no dot) and 1.5e3 (no exponent sign) are strings, not floats."""
    path = tmp_path / "c.yaml"
    path.write_text(f"train: {{lr: {text}, shortcut_weight: {text}}}\n")
    from_file = load_config(str(path))
    from_override = load_config(None, [f"train.lr={text}", f"train.shortcut_weight={text}"])
    assert from_file.train.lr == from_override.train.lr == float(text)
    assert from_file.train.shortcut_weight == from_override.train.shortcut_weight == float(text)
    assert type(from_file.train.lr) is float and type(from_override.train.lr) is float


def test_quoted_number_is_not_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: '1e-3'\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.lr: expected float, got str '1e-3'"):
        load_config(str(path))


def test_non_finite_float_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: .nan\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.weight_decay: expected a finite number, got nan"):
        load_config(str(path))


@pytest.mark.parametrize(
    "text", ["2024", "inf", "nan", "007", "1.50", "1e-3", "0x1F", "1_000", "yes", "null", "~", "2024-01-02"]
)
def test_str_key_takes_the_text_as_written(text, tmp_path):
    cfg = load_config(None, [f"run.dir={text}", f"train.resume={text}", f"llm.name_or_path={text}"])
    assert cfg.run.dir == cfg.train.resume == cfg.llm.name_or_path == text
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  dir: {text}\ntrain: {{resume: {text}}}\n")
    cfg = load_config(str(path))
    assert cfg.run.dir == cfg.train.resume == text
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))  # and a saved config reads back the same text
    assert load_config(str(tmp_path / "run" / "config.yaml")).run.dir == text


def test_str_override_keeps_colons_and_reads_quoted_escapes(tmp_path):
    """A prompt ends with a colon: as an override it is text, not a YAML mapping; quoted, YAML reads the escapes."""
    cfg = load_config(None, ["llm.prompt= A handwritten line reads: ", 'train.resume="a: \\n"'])
    assert cfg.llm.prompt == "A handwritten line reads:" and cfg.train.resume == "a: \n"
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert again.llm.prompt == cfg.llm.prompt and again.train.resume == cfg.train.resume


def test_str_key_reads_quoted_and_empty_values(tmp_path):
    cfg = load_config(None, ["run.dir='runs/a b'", "train.resume="])
    assert cfg.run.dir == "runs/a b" and cfg.train.resume == ""
    path = tmp_path / "c.yaml"
    path.write_text("run:\n  dir: \"2024\"\ntrain:\n  resume:\n")
    cfg = load_config(str(path))
    assert cfg.run.dir == "2024" and cfg.train.resume == ""


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  pth: shards/x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.pth' \(did you mean 'data.path'\?\)"):
        load_config(str(path))


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_save_and_roundtrip(tmp_path):
    cfg = load_config(None, ["train.lr=0.002", "run.dir=/tmp/x"])
    save_config(cfg, str(tmp_path / "run" / "config.yaml"))
    again = load_config(str(tmp_path / "run" / "config.yaml"))
    assert to_dict(again) == to_dict(cfg)
    assert to_dict(from_dict(to_dict(cfg))) == to_dict(cfg)
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temporary file left behind


def test_every_key_documented():
    rows = describe_keys()
    assert len(rows) > 40
    undocumented = [key for key, _, doc in rows if not doc]
    assert undocumented == []
    assert isinstance(Config(), Config)


def test_config_reference_in_sync():
    """docs/config.md's table is generated from the dataclasses; regenerate with
    python -m htr_dist.config --write-reference."""
    from htr_dist.config import reference_markdown, written_reference

    assert written_reference() == reference_markdown()


def test_shipped_configs_load():
    import glob
    import json
    import os

    root = os.path.join(os.path.dirname(__file__), "..")
    files = glob.glob(os.path.join(root, "configs", "*.yaml"))
    assert len(files) >= 5
    for path in files:
        cfg = load_config(path)
        for key in ("deepspeed_config", "llm_deepspeed_config"):  # every JSON a shipped config names exists
            assert os.path.isfile(getattr(cfg.dist, key)), (path, key)
    for path in glob.glob(os.path.join(root, "configs", "deepspeed", "*.json")):
        with open(path) as f:
            ds = json.load(f)
        stage = ds["zero_optimization"]["stage"]
        assert stage == 3 if os.path.basename(path).startswith("llm_") else stage in (0, 1, 2), path


def test_deepspeed_trainable_engine_keeps_fp32_weights_on_every_device(tmp_path):
    """On CUDA with bf16 autocast too: a bf16 engine would cast the module's weights, which validation and export
    use without the engine. A JSON that asks for one is an error that names the file and key."""
    import json
    import types

    import torch

    from htr_dist.dist.strategy import DeepSpeedStrategy

    cfg = load_config(None, ["dist.strategy=deepspeed", "dist.precision=bf16", "train.batch_size=8"])
    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # the config logic only: no engine, no process group
    strategy.cfg = cfg
    strategy.env = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, world_size=4)
    ds = strategy.trainable_config()
    assert ds["bf16"] == {"enabled": False} and "fp16" not in ds
    assert ds["train_batch_size"] == 8 * cfg.train.grad_accum * 4
    for key in ("bf16", "fp16"):
        path = tmp_path / f"{key}.json"
        path.write_text(json.dumps({"zero_optimization": {"stage": 2}, key: {"enabled": True}}))
        cfg.dist.deepspeed_config = str(path)
        with pytest.raises(ConfigError, match=rf"{path}: {key}.enabled: the trainable part keeps fp32 weights"):
            strategy.trainable_config()


def test_config_by_shipped_name_from_any_directory(tmp_path, monkeypatch):
    """--config takes a shipped config's name; the DeepSpeed JSON and LLM-shape paths it names resolve against the
    config's folder, then the package, whatever the working directory."""
    import os

    from htr_dist.config import SHIPPED, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert "iam_llama3b_zero3" in shipped_configs()
    for name in ("iam_llama3b_zero3", "iam_llama3b_zero3.yaml", "configs/iam_llama3b_zero3.yaml"):
        cfg = load_config(name)
        assert cfg.dist.deepspeed_config == os.path.join(SHIPPED, "deepspeed", "trainable_zero2.json")
        assert cfg.llm.name_or_path == "meta-llama/Llama-3.2-3B"  # a hub id is left alone
    cfg = load_config(None, ["llm.name_or_path=configs/llm/llama-3.2-3b"])  # the checkout's spelling, elsewhere
    assert cfg.llm.name_or_path == os.path.join(SHIPPED, "llm", "llama-3.2-3b")
    assert os.path.isfile(load_config(None).dist.llm_deepspeed_config)  # the defaults too

    # a user's config beside its own DeepSpeed file: that file wins over a shipped one of the same name
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "deepspeed").mkdir()
    (tmp_path / "mine" / "deepspeed" / "trainable_zero2.json").write_text("{}")
    (tmp_path / "mine" / "run.yaml").write_text("dist:\n  deepspeed_config: deepspeed/trainable_zero2.json\n")
    monkeypatch.chdir("/")
    cfg = load_config(str(tmp_path / "mine" / "run.yaml"))
    assert cfg.dist.deepspeed_config == str(tmp_path / "mine" / "deepspeed" / "trainable_zero2.json")
    # a command-line path is taken from the working directory, as typed
    monkeypatch.chdir(tmp_path / "mine")
    cfg = load_config(None, ["dist.deepspeed_config=deepspeed/trainable_zero2.json"])
    assert cfg.dist.deepspeed_config == "deepspeed/trainable_zero2.json"
    with pytest.raises(ConfigError, match="config file not found: nope .*shipped configs: demo"):
        load_config("nope")


def test_a_checkpoint_written_with_a_moved_key_still_loads():
    data = to_dict(Config())
    del data["train"]["shortcut_weight"]
    data["arch"]["shortcut_weight"] = 0.7  # as runs wrote it before the loss weights moved to train
    assert from_dict(data).train.shortcut_weight == 0.7


def test_a_checkpoint_from_before_a_default_changed_keeps_its_value(tmp_path):
    """llm.bos_first and llm.line_end: a saved config without them was trained in the layout of its day (BOS after
    the visual tokens, EOS at the end); one that names them, and a config file that does not, get what they say or
    today's defaults."""
    data = to_dict(Config())
    del data["llm"]["bos_first"], data["llm"]["line_end"]
    old = from_dict(data).llm
    assert (old.bos_first, old.line_end) == (False, "eos")
    assert (Config().llm.bos_first, Config().llm.line_end) == (True, "newline")
    saved = to_dict(Config())
    assert (from_dict(saved).llm.bos_first, from_dict(saved).llm.line_end) == (True, "newline")
    path = tmp_path / "mine.yaml"
    path.write_text("llm:\n  max_text_tokens: 24\n")
    assert load_config(str(path)).llm.bos_first is True
    # connector.locality: a connector saved without it was trained without the position prior
    del data["connector"]["locality"]
    assert from_dict(data).connector.locality == 0.0 and Config().connector.locality == 1.0
    assert from_dict(saved).connector.locality == 1.0 and load_config(str(path)).connector.locality == 1.0


def test_resume_check_reads_a_checkpoint_from_before_a_connector_key_as_trained(tmp_path):
    import json

    from htr_dist.errors import InputError
    from htr_dist.train.checkpoint import META, check_same_model

    now = {"alphabet": "ab", "connector": {"kind": "qformer", "locality": 0.0, "dim": 32}}
    (tmp_path / META).write_text(json.dumps({"alphabet": "ab", "connector": {"dim": 32}}))
    check_same_model(str(tmp_path), now)  # written before kind and locality: a Q-Former without the prior
    with pytest.raises(InputError, match="connector.kind 'qformer' there, 'pool' here"):
        check_same_model(str(tmp_path), {**now, "connector": {**now["connector"], "kind": "pool"}})
    with pytest.raises(InputError, match="connector.locality 0.0 there, 1.0 here"):
        check_same_model(str(tmp_path), {**now, "connector": {**now["connector"], "locality": 1.0}})
