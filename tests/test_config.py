"""Recipes: every shipped YAML loads and round-trips; overrides, typos and bad values give clear errors."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from qlora_lite.config import CHOICES, RecipeConfig, apply_override, config_to_dict, load_recipe, save_config, valid_keys
from qlora_lite.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
# Globbed, so a recipe added later (tiny-demo.yaml, ...) is tested without editing this file.
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))

# The 24 GB recipes and what each must train.
GPU_RECIPES = {
    "llama3.1-8b-alpaca.yaml": "meta-llama/Llama-3.1-8B",
    "mistral-7b-alpaca.yaml": "mistralai/Mistral-7B-v0.3",
    "qwen2.5-7b-alpaca.yaml": "Qwen/Qwen2.5-7B",
}


def get_value(cfg: RecipeConfig, key: str):
    """The value of a dotted key such as `train.lr`."""
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def write_recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_loads_and_round_trips(path, tmp_path):
    cfg = load_recipe(path)
    saved = tmp_path / "config.yaml"
    save_config(cfg, saved)
    again = load_recipe(saved)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)
    # Saving the reloaded config writes the same bytes: the resolved form is a fixed point.
    saved_twice = tmp_path / "config2.yaml"
    save_config(again, saved_twice)
    assert saved_twice.read_text() == saved.read_text()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_uses_only_valid_keys(path):
    raw = yaml.safe_load(path.read_text()) or {}
    keys = set()
    for name, value in raw.items():
        if isinstance(value, dict):
            keys |= {f"{name}.{sub}" for sub in value}
        else:
            keys.add(name)
    assert keys <= set(valid_keys()), sorted(keys - set(valid_keys()))


@pytest.mark.parametrize("name,model", sorted(GPU_RECIPES.items()))
def test_gpu_recipes_train_the_named_model_on_alpaca(name, model):
    cfg = load_recipe(RECIPES_DIR / name)
    assert cfg.model.name_or_path == model
    assert cfg.data.format == "alpaca"
    assert cfg.data.path == "yahma/alpaca-cleaned"
    assert cfg.data.eval_fraction == 0.02
    assert cfg.quant.load_in_4bit is True and cfg.quant.quant_type == "nf4"
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32.0
    # The header comments are written for an effective batch of 16 sequences.
    assert cfg.train.micro_batch_size * cfg.train.grad_accum_steps == 16
    assert cfg.train.lr == 2e-4
    assert cfg.output_dir == f"runs/{name.removesuffix('.yaml')}"


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe_header_says_how_to_run_it(name):
    text = (RECIPES_DIR / name).read_text()
    assert text.startswith("#")
    assert f"qlora-lite train recipes/{name}" in text
    assert "train.lr=1e-4" in text
    assert "ESTIMATE" in text


# ---------------------------------------------------------------- key names


REQUIRED_KEYS = [
    "model.name_or_path",
    "data.path",
    "data.format",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "train.max_steps",
    "train.lr",
    "train.micro_batch_size",
    "train.grad_accum_steps",
    "train.max_seq_len",
    "output_dir",
]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_required_key_exists(key):
    assert key in valid_keys()


def test_valid_keys_match_the_dataclasses():
    keys = valid_keys()
    assert len(keys) == len(set(keys))
    flat = set()
    for name, value in config_to_dict(RecipeConfig()).items():
        flat |= {f"{name}.{sub}" for sub in value} if isinstance(value, dict) else {name}
    assert set(keys) == flat


@pytest.mark.parametrize("key", valid_keys())
def test_every_key_accepts_its_default_as_an_override(key):
    """An override of each key with its default's YAML text gives back the defaults exactly."""
    default = get_value(RecipeConfig(), key)
    text = yaml.safe_dump(default, default_flow_style=True).strip()
    text = text.removesuffix("...").strip()  # safe_dump ends a bare scalar with a document marker
    assert load_recipe(overrides=[f"{key}={text}"]) == RecipeConfig()


# ---------------------------------------------------------------- overrides of each type


@pytest.mark.parametrize(
    "override,key,expected",
    [
        # YAML 1.1 reads 1e-4 (no dot) as a string; the float field must still get a float.
        ("train.lr=1e-4", "train.lr", 1e-4),
        ("train.lr=2e-4", "train.lr", 2e-4),
        ("train.lr=3E-5", "train.lr", 3e-5),
        ("train.lr=1.5e-4", "train.lr", 1.5e-4),
        ("train.lr=0.0003", "train.lr", 3e-4),
        ("lora.alpha=16", "lora.alpha", 16.0),  # an int given to a float field
        ("lora.dropout=0", "lora.dropout", 0.0),
        ("train.max_steps=50", "train.max_steps", 50),
        ("lora.r=64", "lora.r", 64),
        ("model.gradient_checkpointing=false", "model.gradient_checkpointing", False),
        ("data.packing=true", "data.packing", True),
        ("model.trust_remote_code=True", "model.trust_remote_code", True),
        ("lora.target_modules=[q_proj,v_proj]", "lora.target_modules", ["q_proj", "v_proj"]),
        ("lora.target_modules=all-linear", "lora.target_modules", "all-linear"),
        ("data.max_examples=100", "data.max_examples", 100),
        ("data.max_examples=null", "data.max_examples", None),
        ("data.max_examples=", "data.max_examples", None),  # empty value means null
        ("train.eval_max_batches=~", "train.eval_max_batches", None),
        ("data.eval_path=held_out.jsonl", "data.eval_path", "held_out.jsonl"),
        ("model.name_or_path=meta-llama/Llama-3.1-8B", "model.name_or_path", "meta-llama/Llama-3.1-8B"),
        ('model.revision="1.0"', "model.revision", "1.0"),  # quoted: a tag that looks like a number
        ("data.path=data/a=b.jsonl", "data.path", "data/a=b.jsonl"),  # only the first '=' splits
        ("output_dir=runs/try-2", "output_dir", "runs/try-2"),
        (" train.max_seq_len = 512", "train.max_seq_len", 512),
    ],
)
def test_override_sets_typed_value(override, key, expected):
    value = get_value(load_recipe(overrides=[override]), key)
    assert value == expected
    assert type(value) is type(expected)


def test_overrides_apply_on_top_of_a_recipe_and_the_last_one_wins(tmp_path):
    path = write_recipe(tmp_path, "train:\n  lr: 2e-4\n  max_steps: 300\nlora:\n  r: 8\n")
    cfg = load_recipe(path, ["train.lr=1e-4", "lora.r=32", "lora.r=4"])
    assert cfg.train.lr == 1e-4
    assert cfg.train.max_steps == 300  # untouched by the overrides
    assert cfg.lora.r == 4
    assert cfg.lora.alpha == 32.0  # a default the recipe never set


def test_recipe_file_float_without_dot_is_a_float(tmp_path):
    path = write_recipe(tmp_path, "train:\n  lr: 1e-4\n  weight_decay: 1e-2\nlora:\n  alpha: 16\n")
    cfg = load_recipe(path)
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 0.01 and isinstance(cfg.train.weight_decay, float)
    assert cfg.lora.alpha == 16.0 and isinstance(cfg.lora.alpha, float)


def test_apply_override_builds_nested_sections():
    raw: dict = {}
    apply_override(raw, "train.lr=1e-4")
    apply_override(raw, "train.max_steps=7")
    apply_override(raw, "output_dir=out")
    assert raw == {"train": {"lr": "1e-4", "max_steps": 7}, "output_dir": "out"}


def test_empty_recipe_file_gives_defaults(tmp_path):
    assert load_recipe(write_recipe(tmp_path, "")) == RecipeConfig()
    assert load_recipe(write_recipe(tmp_path, "# only a comment\n")) == RecipeConfig()


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "key,nearest",
    [
        ("train.lerning_rate", "train.lr"),
        ("train.learning_rate", "train.lr"),
        ("lora.lora_alpha", "lora.alpha"),
        ("lora.lora_dropout", "lora.dropout"),
        ("lora.rank", "lora.r"),
        ("train.gradient_accumulation_steps", "train.grad_accum_steps"),
        ("train.per_device_train_batch_size", "train.micro_batch_size"),
        ("train.max_seq_length", "train.max_seq_len"),
        ("train.max_step", "train.max_steps"),
        ("model.model_name", "model.name_or_path"),
        ("modle.name_or_path", "model"),
        ("trian.lr", "train"),
        ("output_directory", "output_dir"),
    ],
)
def test_unknown_override_key_names_nearest_valid_key(key, nearest):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[f"{key}=1"])
    message = str(err.value)
    bad = key if key.split(".")[0] in {"model", "quant", "lora", "data", "train"} else key.split(".")[0]
    assert repr(bad) in message
    assert f"did you mean {nearest!r}?" in message


@pytest.mark.parametrize(
    "text,bad,nearest",
    [
        ("modle:\n  name_or_path: x\n", "modle", "model"),
        ("train:\n  lerning_rate: 1e-4\n", "train.lerning_rate", "train.lr"),
        ("lora:\n  lora_alpha: 16\n", "lora.lora_alpha", "lora.alpha"),
    ],
)
def test_unknown_recipe_key_names_nearest_valid_key(tmp_path, text, bad, nearest):
    with pytest.raises(ConfigError, match=f"unknown recipe key '{bad}'; did you mean '{nearest}'"):
        load_recipe(write_recipe(tmp_path, text))


# A nested key written at the top level (section forgotten) points to its section.
@pytest.mark.parametrize("key", ["lr", "learning_rate"])
def test_nested_key_at_top_level_suggests_its_section(key):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        load_recipe(overrides=[f"{key}=2e-4"])


# ---------------------------------------------------------------- wrong types and ranges


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.max_steps=abc", "train.max_steps"),
        ("train.max_steps=1.5", "train.max_steps"),
        ("train.max_steps=true", "train.max_steps"),  # a bool is not an int here
        ("lora.r=16.0", "lora.r"),
        ("train.lr=abc", "train.lr"),
        ("train.lr=true", "train.lr"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
        ("model.gradient_checkpointing=1", "model.gradient_checkpointing"),
        ("data.path=[a,b]", "data.path"),
        ("data.path=2024", "data.path"),  # a number: quote it ("2024") if it really is a path
        ("lora.target_modules=[q_proj,3]", "lora.target_modules"),
        ("model.name_or_path=", "model.name_or_path"),  # null only where the key is optional
        ("train.lr=null", "train.lr"),
    ],
)
def test_wrong_type_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[override])
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("r", [0, -1])
def test_nonpositive_rank_rejected(r, tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.r must be a positive integer, got " + str(r)):
        load_recipe(overrides=[f"lora.r={r}"])
    with pytest.raises(ConfigError, match=r"lora\.r"):
        load_recipe(write_recipe(tmp_path, f"lora:\n  r: {r}\n"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.dropout=-0.1", "lora.dropout"),
        ("data.eval_fraction=1", "data.eval_fraction"),
        ("data.eval_fraction=-0.5", "data.eval_fraction"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.grad_accum_steps=-2", "train.grad_accum_steps"),
        ("train.max_seq_len=0", "train.max_seq_len"),
        ("train.lr=0", "train.lr"),
        ("train.lr=-1e-4", "train.lr"),
        ("lora.target_modules=''", "lora.target_modules"),  # an empty name is no target (q_proj alone is [q_proj]: see below)
    ],
)
def test_out_of_range_value_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[override])
    assert str(err.value).startswith(key)


# Values that would break or silently spoil a run: NaN/inf, a negative clip norm (clip_grad_norm_
# with a negative max flips the gradients' sign), alpha=0 or no targets (nothing trains), negative counts.
@pytest.mark.parametrize(
    "override,key",
    [
        ("train.lr=nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("lora.alpha=.nan", "lora.alpha"),
        ("lora.alpha=0", "lora.alpha"),
        ("train.max_grad_norm=-1", "train.max_grad_norm"),
        ("train.warmup_steps=-5", "train.warmup_steps"),
        ("train.eval_every=-1", "train.eval_every"),
        ("train.save_every=-1", "train.save_every"),
        ("train.log_every=0", "train.log_every"),
        ("lora.target_modules=[]", "lora.target_modules"),
    ],
)
def test_unusable_value_rejected(override, key):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[override])
    assert str(err.value).startswith(key)


@pytest.mark.parametrize("key,allowed", sorted(CHOICES.items()))
def test_value_outside_choices_lists_allowed_values(key, allowed):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[f"{key}=xml"])
    message = str(err.value)
    assert message.startswith(f"{key}: 'xml' is not one of ")
    for choice in allowed:
        assert choice in message


def test_data_format_xml_rejected():
    with pytest.raises(ConfigError, match=r"^data\.format: 'xml' is not one of alpaca, chat, text, preference, unpaired$"):
        load_recipe(overrides=["data.format=xml"])


# ---------------------------------------------------------------- files and override syntax


def test_missing_recipe_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"recipe .*nope\.yaml does not exist"):
        load_recipe(missing)


def test_invalid_yaml(tmp_path):
    path = write_recipe(tmp_path, "train:\n  lr: [1e-4\n")
    with pytest.raises(ConfigError, match=r"recipe .*recipe\.yaml is not valid YAML"):
        load_recipe(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        load_recipe(write_recipe(tmp_path, "- model\n- train\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"^train must be a section"):
        load_recipe(write_recipe(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"^train must be a section"):
        load_recipe(overrides=["train=5"])


@pytest.mark.parametrize("item", ["train.lr", "train.lr 1e-4", "lora.r:16"])
def test_override_without_equals_rejected(item):
    with pytest.raises(ConfigError, match=r"must look like key\.sub=value, e\.g\. train\.lr=1e-4"):
        load_recipe(overrides=[item])


def test_override_through_a_scalar_rejected(tmp_path):
    path = write_recipe(tmp_path, "output_dir: runs/a\n")
    with pytest.raises(ConfigError, match="output_dir is not a section"):
        load_recipe(path, ["output_dir.name=x"])


def test_default_config_round_trips(tmp_path):
    cfg = load_recipe()
    assert cfg == RecipeConfig()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_recipe(tmp_path / "c.yaml") == cfg
    assert [f.name for f in dataclasses.fields(cfg)] == ["method", "model", "quant", "lora", "prompt", "selective", "bottleneck", "data", "train", "objective", "dist", "output_dir"]


def test_readme_documents_every_key():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    missing = [key for key in valid_keys() if f"`{key}`" not in readme]
    assert missing == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=dora"], "method: 'dora' is not one of lora, prompt_tuning, selective, adapter, full"),
        (["method=full"], "set quant.load_in_4bit: false"),
        (["method=prompt_tuning", "data.packing=true"], "set data.packing: false"),
        (["method=prompt_tuning", "prompt.num_virtual_tokens=0"], "prompt.num_virtual_tokens must be a positive integer, got 0"),
        (["method=prompt_tuning", "prompt.init=text"], "prompt.init_text is empty"),
        (["method=selective", "selective.patterns=[]"], "selective.patterns is empty"),
        (["method=adapter", "bottleneck.size=-4"], "bottleneck.size must be a positive integer, got -4"),
        (["bottleneck.placement=ffn"], "bottleneck.placement: 'ffn' is not one of attn, mlp, both"),
        (["prompt.init=vocab"], "prompt.init: 'vocab' is not one of text, sample_vocab, random"),
    ],
)
def test_method_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(None, overrides)


def test_method_settings_that_fit_are_accepted():
    cfg = load_recipe(None, ["method=prompt_tuning", "prompt.init=text", "prompt.init_text=Translate to French", "prompt.num_virtual_tokens=50"])
    assert (cfg.method, cfg.prompt.num_virtual_tokens, cfg.prompt.init_text) == ("prompt_tuning", 50, "Translate to French")
    assert load_recipe(None, ["method=full", "quant.load_in_4bit=false"]).method == "full"


@pytest.mark.parametrize("key", ["foo", "train.foo", "zzz_top"])
def test_unknown_key_with_nothing_close_gets_no_suggestion(key):
    with pytest.raises(ConfigError) as err:
        load_recipe(overrides=[f"{key}=1"])
    assert "did you mean" not in str(err.value) and "unknown recipe key" in str(err.value)


@pytest.mark.parametrize(
    "key,nearest",
    [
        ("epochs", "train.epochs"),
        ("num_epochs", "train.epochs"),
        ("train.num_train_epochs", "train.epochs"),
        ("per_device_train_batch_size", "train.micro_batch_size"),
        ("gradient_accumulation_steps", "train.grad_accum_steps"),
        ("learning_rate", "train.lr"),
        ("lora_r", "lora.r"),
        ("lora_alpha", "lora.alpha"),
        ("max_seq_length", "train.max_seq_len"),
        ("train.save_steps", "train.save_every"),
    ],
)
def test_names_from_other_tools_map_to_ours(key, nearest):
    with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
        load_recipe(overrides=[f"{key}=1"])


def test_epochs_must_be_positive():
    assert load_recipe(overrides=["train.epochs=2.5"]).train.epochs == 2.5
    with pytest.raises(ConfigError, match=r"train.epochs must be a positive number or null \(use train.max_steps\), got 0"):
        load_recipe(overrides=["train.epochs=0"])


def test_data_files_are_read_from_where_the_command_runs_then_beside_the_recipe(tmp_path, monkeypatch):
    """Issue 22: how relative paths are read (README, Recipes); cache_dir and output_dir are read from where the command runs."""
    from qlora_lite.data.cache import resolve_data_cache_dir

    recipes, work = tmp_path / "recipes", tmp_path / "work"
    (recipes / "data").mkdir(parents=True)
    (recipes / "data" / "train.jsonl").write_text("{}\n")
    (recipes / "r.yaml").write_text("data: {path: data/train.jsonl, eval_path: data/eval.jsonl, cache_dir: dc}\noutput_dir: runs/x\n")
    work.mkdir()
    monkeypatch.chdir(work)
    here = Path.cwd()
    cfg = load_recipe("../recipes/r.yaml")
    assert cfg.data.path == "../recipes/data/train.jsonl" and (here / cfg.data.path).is_file()  # not here: beside the recipe
    assert cfg.data.eval_path == "data/eval.jsonl"  # found nowhere: as given, and the data reader names it
    assert (cfg.data.cache_dir, cfg.output_dir) == ("dc", "runs/x")  # as given in config.yaml ...
    assert resolve_data_cache_dir(cfg.data) == here / "dc"  # ... and read from here
    (here / "data").mkdir()
    (here / "data" / "train.jsonl").write_text("{}\n")
    assert load_recipe("../recipes/r.yaml").data.path == "data/train.jsonl"  # where the command runs comes first
    assert load_recipe(None, ["data.path=tatsu-lab/alpaca"]).data.path == "tatsu-lab/alpaca"  # a hub id stays one



def test_all_linear_stays_the_word_and_a_wrong_single_name_is_still_named():
    assert load_recipe(overrides=["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match=r"^train\.report_to: 'tensorbord' is not one of tensorboard, wandb, mlflow, trackio$"):
        load_recipe(overrides=["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match=r"^train\.report_to must be list\[str\], got 3 \(int\)$"):
        load_recipe(overrides=["train.report_to=3"])


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("lora:\n  r: 8\n  r: 16\n", "lora.r", "lines 2 and 3"),
        ("train:\n  lr: 1e-4\nlora:\n  r: 8\ntrain:\n  max_steps: 5\n", "train", "lines 1 and 5"),
        ("output_dir: a\noutput_dir: b\n", "output_dir", "lines 1 and 2"),
        ("lora: {r: 8, alpha: 16, r: 4}\n", "lora.r", "line 1"),
    ],
)
def test_a_key_given_twice_in_a_recipe_is_refused_with_its_lines(tmp_path, text, key, lines):
    path = write_recipe(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value) == f"recipe {path}: key {key} is given twice ({lines}); keep one"


def test_a_yaml_merge_key_is_not_a_duplicate(tmp_path):
    path = write_recipe(tmp_path, "lora:\n  <<: {r: 8, alpha: 16.0}\n  r: 4\n")
    cfg = load_recipe(path)
    assert (cfg.lora.r, cfg.lora.alpha) == (4, 16.0)


def test_an_override_given_twice_on_the_command_line_keeps_the_last_one_unlike_a_recipe_key(tmp_path):
    """Command lines conventionally let a later flag win (a wrapper script appends to the user's); a YAML file has no such order of intent."""
    path = write_recipe(tmp_path, "train:\n  lr: 3e-4\n")
    assert load_recipe(path, ["train.lr=1", "train.lr=2"]).train.lr == 2.0
    assert load_recipe(path, ["train.report_to=[wandb]", "train.report_to=tensorboard"]).train.report_to == ["tensorboard"]


def test_an_unquoted_no_is_the_choice_no_not_false(tmp_path):
    # YAML 1.1 reads `no` as false; train.mixed_precision's choices include the word itself.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name_or_path: demo:tiny\ndata:\n  path: x.jsonl\ntrain:\n  mixed_precision: no\n")
    assert load_recipe(recipe).train.mixed_precision == "no"
    assert load_recipe(None, ["model.name_or_path=demo:tiny", "data.path=x.jsonl", "train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.loss must be str"):
        load_recipe(None, ["model.name_or_path=demo:tiny", "data.path=x.jsonl", "train.loss=no"])
