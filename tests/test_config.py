"""Config: defaults, preset < TOML < CLI precedence, strict keys with did-you-mean, types, JSON round trip."""

import json
import re
from pathlib import Path

import pytest

from lmforge.config import (
    RunConfig,
    config_from_json,
    help_lines,
    load_config,
    parse_overrides,
)
from lmforge.errors import ConfigError
from lmforge.presets import PRESETS


def test_defaults_are_valid_and_derived_values():
    cfg = RunConfig()
    assert cfg.train.micro_batch == cfg.train.batch_size and cfg.train.accum_steps == 1
    assert cfg.model.head_dim * cfg.model.n_head == cfg.model.d_model
    assert cfg.train.final_lr == pytest.approx(cfg.train.lr / 10)


def test_precedence_defaults_preset_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nlr = 0.005\nmax_steps = 77\n[model]\nn_layer = 3\n", encoding="utf-8")
    cfg = load_config(preset="tiny", config_file=toml, overrides=["--train.lr", "1e-3", "--model.d_model=96"])
    assert cfg.train.lr == 1e-3  # flag beats file
    assert cfg.train.max_steps == 77  # file beats preset (tiny says 200)
    assert cfg.model.n_layer == 3  # file beats preset (tiny says 2)
    assert cfg.model.d_model == 96  # flag beats preset
    assert cfg.model.n_head == 4  # preset beats default (6)
    assert cfg.train.seed == RunConfig().train.seed  # default kept
    assert cfg.preset == "tiny"


def test_preset_named_in_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "gpt2-124m"\n', encoding="utf-8")
    cfg = load_config(config_file=toml)
    assert (cfg.model.n_layer, cfg.model.d_model, cfg.model.max_seq_len, cfg.model.vocab_size) == (12, 768, 1024, 50257)
    assert cfg.model.tie_embeddings


def test_toml_saved_with_a_bom_and_crlf_loads(tmp_path):
    # Windows Notepad's "UTF-8" starts with a BOM: it was "invalid TOML (Invalid statement (at line 1, column 1))"
    toml = tmp_path / "run.toml"
    toml.write_bytes(b"\xef\xbb\xbf[train]\r\nlr = 0.005\r\n")
    assert load_config(config_file=toml).train.lr == 0.005
    toml.write_bytes(b"\xff\xfe[\x00t\x00")  # UTF-16 is still refused in one line
    with pytest.raises(ConfigError, match="not UTF-8 text; save the config as UTF-8 TOML"):
        load_config(config_file=toml)


def test_a_config_that_is_a_pipe_is_said_to_be_one_not_missing(tmp_path):
    """`--config` naming a FIFO (or a device) said "config file ... not found" of a path that exists."""
    import os

    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="is a pipe or device, not a file; save the settings to a .toml file$"):
        load_config(config_file=fifo)
    with pytest.raises(ConfigError, match="not found; pass an existing .toml file to --config$"):
        load_config(config_file=tmp_path / "missing.toml")


def test_an_empty_config_path_or_file_is_refused_not_taken_as_no_config(tmp_path):
    """`--config ''` (an unset shell variable) ran with no config at all, and a file with no settings (empty, or
    comments only) as if there were none: both are one-line errors now; /dev/null stays refused as a device."""
    with pytest.raises(ConfigError, match="^--config is empty; pass a .toml file or a run folder, or drop --config$"):
        load_config(config_file="")
    with pytest.raises(ConfigError, match="^--config is empty"):
        load_config(config_file="  ")
    toml = tmp_path / "run.toml"
    for text in ("", "# lr = 1e-3\n"):
        toml.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError, match=r"run\.toml' holds no settings; write them in it"):
            load_config(config_file=toml)
    with pytest.raises(ConfigError, match="is a pipe or device, not a file"):
        load_config(config_file="/dev/null")


def test_names_from_other_trainers_point_at_lmforge_keys(tmp_path):
    # spelling alone pointed these at optim.name, train.min_lr, model.n_head and train.batch_size
    for given, ours in [
        ("optim.learning_rate", "train.lr"),
        ("train.learning_rate", "train.lr"),
        ("model.n_embd", "model.d_model"),
        ("data.block_size", "data.seq_len"),
        ("train.eval_interval", "eval.every"),
        ("train.gradient_accumulation_steps", "train.micro_batch_size"),
    ]:
        with pytest.raises(ConfigError, match=rf"unknown config key '{given}' .*did you mean '{ours}'\?$"):
            parse_overrides([f"--{given}", "1"])
    # a flag without a section: another trainer's name, or one of ours without its section
    with pytest.raises(ConfigError, match=r"unexpected argument '--learning_rate'; did you mean --train.lr\?$"):
        parse_overrides(["--learning_rate", "1e-3"])
    with pytest.raises(ConfigError, match=r"unexpected argument '--max_steps'; did you mean --train.max_steps\?$"):
        parse_overrides(["--max_steps", "5"])
    with pytest.raises(ConfigError, match=r"unexpected argument '--bogus'; settings look like --section.key"):
        parse_overrides(["--bogus", "5"])
    # other tools' spellings of a setting (hydra's key=value, --set/-o KEY=VALUE): "settings look like --section.key
    # VALUE", and `--set=train.lr=1e-3` "unknown config key 'set'; did you mean 'preset'?"
    for given in (["train.lr=1e-3"], ["--set", "train.lr=1e-3"], ["--set=train.lr=1e-3"], ["-o", "train.lr=1e-3"]):
        with pytest.raises(ConfigError, match=r"unexpected argument '.*'; did you mean --train.lr 1e-3\?$"):
            parse_overrides(given)
    with pytest.raises(ConfigError, match=r"unexpected argument '--set'; settings look like --section.key"):
        parse_overrides(["--set", "x=1"])
    # --resume (litgpt, nanoGPT's init_from) said only "settings look like --section.key VALUE"
    for flag in (["--resume"], ["--resume_from_checkpoint", "runs/x"]):
        with pytest.raises(ConfigError, match=r"resumes from the latest checkpoint by itself; drop it"):
            parse_overrides(flag)
    toml = tmp_path / "hf_names.toml"
    toml.write_text("[optim]\nlearning_rate = 1e-3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'.*did you mean 'train.lr'"):
        load_config(config_file=toml)


def test_resume_from_is_short_for_checkpoint_resume_from():
    # `--resume-from previous` (as the fault-tolerance issue names it) was refused: "did you mean
    # --checkpoint.resume_from?"
    for flag in (["--resume-from", "previous"], ["--resume-from=previous"], ["--resume_from", "previous"]):
        assert parse_overrides(flag) == {"checkpoint": {"resume_from": "previous"}}
    with pytest.raises(ConfigError, match=r"--checkpoint.resume_from needs a value"):
        parse_overrides(["--resume-from"])


def test_unknown_keys_fail_with_did_you_mean(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.lr'"):
        parse_overrides(["--train.lrr", "1"])
    with pytest.raises(ConfigError, match="did you mean 'model.n_layer'"):
        parse_overrides(["--model.n_layers", "2"])
    # a setting looked for in a section that does not exist is found in the one that has it
    with pytest.raises(ConfigError, match=r"unknown config key 'log.every'.*did you mean 'train.log_every'\?$"):
        parse_overrides(["--log.every", "5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'foo.bar' in command-line overrides$"):
        parse_overrides(["--foo.bar", "5"])
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nmax_step = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(config_file=toml)
    with pytest.raises(ConfigError, match="unknown preset 'tin'.*did you mean 'tiny'"):
        load_config(preset="tin")


def test_a_section_or_preset_of_the_wrong_type_in_toml_is_refused(tmp_path):
    """`train = 3` was replaced, unseen, by any --train.* flag's table (the run trained 1000 steps);
    `preset = 5` was a TypeError traceback from the did-you-mean."""
    toml = tmp_path / "bad.toml"
    toml.write_text('preset = "tiny"\ntrain = 3\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"train: expected a table of settings \(\[train\]\), got 3"):
        load_config(config_file=toml, overrides=["--train.lr", "1e-3"])
    toml.write_text("preset = 5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="preset: expected a preset name"):
        load_config(config_file=toml)
    # a setting of the wrong type under a flag that sets it: unread, until the flag was dropped
    toml.write_text('[train]\nmax_steps = "three"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.toml: train.max_steps: expected int, got 'three'$"):
        load_config(config_file=toml, overrides=["--train.max_steps", "5"])
    toml.write_text('[model]\nfamily = "lstm"\nn_layer = 1\n', encoding="utf-8")  # (each family names its own)
    assert load_config(config_file=toml, overrides=["--model.n_layer", "2"]).model.n_layer == 2


def test_wrong_types_and_values():
    with pytest.raises(ConfigError, match="train.lr: expected float"):
        load_config(overrides=["--train.lr", "fast"])
    with pytest.raises(ConfigError, match="model.n_layer: expected int"):
        load_config(overrides=["--model.n_layer", "2.5"])
    with pytest.raises(ConfigError, match="model.norm: 'rms' is not one of.*did you mean 'rmsnorm'"):
        load_config(overrides=["--model.norm", "rms"])
    with pytest.raises(ConfigError, match=r"\(10\); pass --train.micro_batch_size 2 \(or 0: the whole batch"):
        load_config(overrides=["--train.batch_size", "10", "--train.micro_batch_size", "4"])
    # a preset's micro-batch under a smaller batch: the error said only "must divide", now which value fits
    with pytest.raises(ConfigError, match=r"micro_batch_size \(12\) must divide .* \(2\); pass --train.micro_batch"):
        load_config(preset="gpt2-124m", overrides=["--train.batch_size", "2"])
    with pytest.raises(ConfigError, match=r"\(10000000000000000007\); pass --train.micro_batch_size 1 "):
        load_config(overrides=["--train.batch_size", "10000000000000000007", "--train.micro_batch_size", "3"])
    load_config(overrides=["--train.batch_size", str(10**11)])  # (the suggestion is no search through 10**11)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be >= 0 \(0 = train.batch_size\), got -1"):
        load_config(overrides=["--train.micro_batch_size", "-1"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["--model.d_model", "100", "--model.n_head", "3"])
    with pytest.raises(ConfigError, match="'model.n_head'.*model.family 'lstm' has no such setting.*d_model"):
        load_config(preset="lstm-tiny", overrides=["--model.n_head", "4"])
    with pytest.raises(ConfigError, match="train.compile_mode 'reduce-overhead' needs train.compile true"):
        load_config(overrides=["--train.compile_mode", "reduce-overhead"])
    cfg = load_config(overrides=["--train.compile", "true", "--train.compile_mode", "reduce-overhead"])
    assert cfg.train.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--train.lr"])
    for typed in ("--train-lr", "--train_lr=1e-3"):  # the dot typed as a dash or underscore
        with pytest.raises(ConfigError, match=r"did you mean --train\.lr\?"):
            parse_overrides([typed, "1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean --train\.max_steps\?"):
        parse_overrides(["--train-max-steps", "5"])
    with pytest.raises(ConfigError, match=r"^--train.lr needs a value"):  # (was: "unexpected argument '5'")
        parse_overrides(["--train.lr", "--train.max_steps", "5"])
    assert parse_overrides(["--train.lr", "-1e-3"]) == {"train": {"lr": "-1e-3"}}  # a negative value is a value


def test_bools_and_ints_from_strings():
    cfg = load_config(overrides=["--model.bias", "false", "--train.compile", "yes", "--train.max_steps", "1e3"])
    assert cfg.model.bias is False and cfg.train.compile is True and cfg.train.max_steps == 1000


def test_json_round_trip():
    cfg = load_config(preset="small", overrides=["--train.lr", "2e-4"])
    again = config_from_json(json.loads(cfg.to_json()), where="config.json")
    assert again == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads(name):
    assert load_config(preset=name).preset == name


def test_every_field_has_help():
    for key, text, _ in help_lines():
        assert text, f"{key} has no help text"


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")), ids=lambda p: p.name
)
def test_every_shipped_config_loads(path):
    cfg = load_config(config_file=path)
    assert cfg.preset, f"{path.name} should name the preset it builds on"


def test_the_slurm_example_fits_the_world_size_it_asks_for():
    """examples/slurm-pretrain.sbatch's settings load and split gpt2-124m's global batch of 480 over its
    nodes x GPUs (its micro-batch 12 did not: 480 / 16 GPUs = 30 each, so pretrain refused to start)."""
    import re
    import shlex

    text = (Path(__file__).parent.parent / "examples" / "slurm-pretrain.sbatch").read_text(encoding="utf-8")
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)$", text, re.M).group(1))
    per_node = int(re.search(r"--nproc-per-node (\d+)", text).group(1))
    args = shlex.split(text.split("-m lmforge pretrain", 1)[1].replace("\\\n", " "))
    settings = dict(zip(args[::2], args[1::2], strict=True))
    preset = settings.pop("--preset")
    assert settings.pop("--data") and settings.pop("--out")
    cfg = load_config(preset=preset, overrides=[item for pair in settings.items() for item in pair])
    assert cfg.dist.strategy == "fsdp"
    assert cfg.train.micro_batch_per_rank(nodes * per_node) == cfg.train.micro_batch_size


def test_preset_model_keys_of_another_family_are_dropped():
    """`--preset tiny --model.family lstm`: tiny's n_head is the preset's, not an unknown key of the user's."""
    cfg = load_config(preset="tiny", overrides={"model": {"family": "lstm"}})
    assert cfg.model.family == "lstm"
    with pytest.raises(ConfigError, match="unknown config key 'model.n_head'"):  # given by the user: still an error
        load_config(preset="tiny", overrides={"model": {"family": "lstm", "n_head": 4}})


def test_a_mixture_with_a_curriculum_says_what_to_drop():
    # it said only "cannot be combined yet", not which flag to change
    with pytest.raises(ConfigError, match=r"combined yet; drop --data.mix or --data.curriculum$"):
        load_config(preset="tiny", overrides=["--data.mix", "a=0.5,b=0.5", "--data.curriculum", "doc_length"])


def test_settings_the_objective_or_tokenizer_would_not_use_are_refused():
    from lmforge.data.prepare import PrepareConfig

    with pytest.raises(ConfigError, match="objective.whole_word is not used by objective 'clm'"):
        load_config(preset="tiny", overrides={"objective": {"whole_word": True}})
    with pytest.raises(ConfigError, match="objective.rtd_weight is not used by objective 'mlm'"):
        load_config(preset="bert-tiny", overrides={"objective": {"name": "mlm", "rtd_weight": 10.0}})
    load_config(preset="bert-tiny", overrides={"objective": {"whole_word": True}})  # where it applies
    with pytest.raises(ConfigError, match="objective.mask_prob is not used by objective 'clm'"):  # at its default
        load_config(preset="tiny", overrides=["--objective.mask_prob", "0.15"])
    load_config(preset="bert-tiny", overrides=["--objective.mask_prob", "0.15"])
    with pytest.raises(ConfigError, match="--special-tokens all applies to a trained bpe tokenizer"):
        PrepareConfig(inputs=["x.txt"], out="o", tokenizer="char", special_tokens="all")


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["--optim.momentum", "0.5"], "optim.momentum is not used by optim.name adamw (only by sgd); drop it, or pass"),
        (["--optim.name", "sgd", "--optim.beta2", "0.9"], "optim.beta2 is not used by optim.name sgd (only by adamw"),
        (["--optim.muon_lr", "0.01"], "optim.muon_lr is not used by optim.name adamw (only by muon)"),
        (["--optim.name", "muon", "--optim.fused", "on"], "optim.fused is not used by optim.name muon (only by adamw)"),
        (["--optim.nesterov", "false"], "optim.nesterov is not used by optim.name adamw"),  # written, at its default
        (
            ["--optim.name", "muon", "--optim.momentum", "0.9"],
            "optim.momentum is not used by optim.name muon (only by sgd); drop it, or set --optim.muon_momentum",
        ),
    ],
)
def test_optimizer_settings_the_optimizer_would_not_read_are_refused(overrides, refused):
    """--optim.momentum with AdamW, betas with SGD and Muon's settings without Muon were accepted and ignored."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(refused)}"):
        load_config(preset="tiny", overrides=overrides)


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (
            ["--train.schedule", "constant", "--train.min_lr", "1e-4"],
            "train.min_lr is not used by train.schedule constant",
        ),
        (
            ["--train.decay_fraction", "0.5"],
            "train.decay_fraction is used by train.schedule wsd only, and this run's is",
        ),
        (["--train.early_stop_min_delta", "0.1"], "train.early_stop_min_delta is used by early stopping, which is off"),
    ],
)
def test_train_settings_the_run_would_not_read_are_refused(overrides, refused, tmp_path):
    """Each was accepted and silently ignored (a constant lr has no floor, only wsd reads decay_fraction, and
    min_delta only matters with a patience); written in a TOML file, too. A preset's min_lr is not the user's."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(refused)}"):
        load_config(preset="tiny", overrides=overrides)
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\ndecay_fraction = 0.5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="train.decay_fraction is used by train.schedule wsd only"):
        load_config(preset="tiny", config_file=toml)
    load_config(preset="tiny", overrides=["--train.schedule", "wsd", "--train.decay_fraction", "0.5"])
    load_config(preset="tiny", overrides=["--train.early_stop_patience", "2", "--train.early_stop_min_delta", "0.1"])
    assert load_config(preset="small", overrides=["--train.schedule", "constant"]).train.min_lr == 1e-4  # the preset's


def test_curriculum_steps_0_with_a_curriculum_is_refused(tmp_path):
    """--data.curriculum doc_length --data.curriculum_steps 0 made every window eligible from step 0: accepted, and
    quietly no curriculum. Refused in one line (flags and TOML); a saved run's config.json with it still loads."""
    refused = "data.curriculum_steps 0 means no curriculum"
    with pytest.raises(
        ConfigError, match=f"^{refused}.*pass --data.curriculum_steps N > 0, or drop --data.curriculum$"
    ):
        load_config(preset="tiny", overrides=["--data.curriculum", "doc_length", "--data.curriculum_steps", "0"])
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\ncurriculum = "doc_length"\ncurriculum_steps = 0\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))}: {refused}"):
        load_config(preset="tiny", config_file=toml)
    with pytest.raises(ConfigError, match="^data.curriculum_steps is used by data.curriculum doc_length only"):
        load_config(preset="tiny", overrides=["--data.curriculum_steps", "0"])  # no curriculum asked for: unused
    saved = load_config(preset="tiny", overrides=["--data.curriculum", "doc_length"]).to_dict()
    saved["data"]["curriculum_steps"] = 0
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    assert load_config(config_file=tmp_path).data.curriculum_steps == 0


def test_diloco_settings_under_another_strategy_are_refused(tmp_path, capsys):
    """--dist.sync_every (and DiLoCo's outer optimizer settings) under ddp or fsdp were accepted and ignored; a TOML
    file's and estimate's --strategy too. A diloco run's config.json gives them way to another --dist.strategy."""
    for overrides, strategy in ((["--dist.sync_every", "10"], "ddp"), (["--dist.outer_lr", "0.5"], "ddp"),
                                (["--dist.strategy", "fsdp", "--dist.outer_momentum", "0.9"], "fsdp")):  # fmt: skip
        name = overrides[-2].removeprefix("--")
        with pytest.raises(ConfigError, match=rf"^{name} is read only by --dist.strategy diloco .*not by {strategy}; "):
            load_config(preset="tiny", overrides=overrides)
    toml = tmp_path / "run.toml"
    toml.write_text("[dist]\nsync_every = 20\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="pass --dist.strategy diloco$"):
        load_config(preset="tiny", config_file=toml)
    cfg = load_config(preset="tiny", config_file=toml, overrides=["--dist.strategy", "diloco"])
    assert (cfg.dist.strategy, cfg.dist.sync_every) == ("diloco", 20)
    run = tmp_path / "config.json"
    run.write_text(json.dumps(cfg.to_dict()), encoding="utf-8")
    assert load_config(config_file=run, overrides=["--dist.strategy", "ddp"]).dist.strategy == "ddp"
    from lmforge.cli import main

    estimate = ["estimate", "--preset", "tiny", "--tokens", "1e5", "--hardware", "1000", "--dist.sync_every", "5"]
    with pytest.raises(SystemExit) as exit_info:
        main(estimate)
    assert exit_info.value.code == 2 and capsys.readouterr().err.startswith("lmforge: error: dist.sync_every is read")
    with pytest.raises(SystemExit) as exit_info:
        main([*estimate, "--strategy", "diloco", "--world-size", "2"])  # the plan's strategy reads it
    assert exit_info.value.code == 0
    assert "diloco, every 5 steps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # two strategies named: --strategy won without a word
        main([*estimate, "--strategy", "diloco", "--dist.strategy", "ddp", "--world-size", "2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--strategy diloco and --dist.strategy ddp name the same setting" in err, err


@pytest.mark.parametrize("preset", ["lstm-tiny", "gru-tiny"])
def test_muon_on_a_recurrent_network_is_refused(preset):
    """Muon trains hidden nn.Linear matrices; a recurrent network has none, so every weight got AdamW silently."""
    with pytest.raises(ConfigError, match=r"^optim.name muon orthogonalises .* use --optim.name adamw or sgd$"):
        load_config(preset=preset, overrides=["--optim.name", "muon"])
    load_config(preset="tiny", overrides=["--optim.name", "muon"])  # a Transformer has them


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_carry_state_on_a_transformer_is_refused(preset):
    """objective.carry_state (LSTM/GRU's hidden state across batches) was accepted for a GPT or Llama model, which
    never reads it; written by the user it is now refused in one line, and still read by a recurrent model."""
    for value in ("true", "false"):
        with pytest.raises(
            ConfigError, match=r"^objective.carry_state is not used by model.family .*only by lstm or gru"
        ):
            load_config(preset=preset, overrides=["--objective.carry_state", value])
    assert (
        load_config(preset="lstm-tiny", overrides=["--objective.carry_state", "false"]).objective.carry_state is False
    )
    load_config(preset=preset)  # (its default, not written, is no error)


def test_a_presets_optimizer_settings_give_way_to_another_optimizer(tmp_path):
    """The preset's AdamW beta2 (0.99) is the preset's, not the user's: --optim.name sgd drops it; a config file's
    is the user's, and refused; the same settings where they apply are kept."""
    assert load_config(preset="small", overrides=["--optim.name", "sgd"]).optim.beta2 == 0.95  # the default
    assert load_config(preset="small").optim.beta2 == 0.99
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nbeta2 = 0.99\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="optim.beta2 is not used by optim.name sgd"):
        load_config(preset="small", config_file=toml, overrides=["--optim.name", "sgd"])
    cfg = load_config(overrides=["--optim.name", "muon", "--optim.muon_lr", "0.05", "--optim.beta1", "0.8"])
    assert (cfg.optim.muon_lr, cfg.optim.beta1) == (0.05, 0.8)
    from lmforge.finetune import finetune_sections

    with pytest.raises(ConfigError, match="optim.momentum is not used by optim.name adamw"):
        finetune_sections("full", {"optim": {"momentum": 0.5}})
    assert finetune_sections("full", {"optim": {"name": "sgd", "momentum": 0.5}})[1].momentum == 0.5


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("train.early_stop_min_delta", "-1"),  # a worse loss reset the patience
        ("train.early_stop_min_delta", "nan"),  # every evaluation counted as no better
        ("train.rollback_after", "-1"),  # rolled back after the first non-finite step
        ("optim.l1", "inf"),  # every step's gradient non-finite, every step skipped
        ("train.min_lr", "inf"),  # every lr after warmup inf or NaN: NaN steps, then "lower --train.lr"
        ("optim.weight_decay", "inf"),  # every weight NaN after the first step
        ("optim.eps", "inf"),  # every AdamW update 0: trained nothing, without a word
        ("optim.muon_lr", "inf"),  # every hidden matrix non-finite after the first Muon step
    ],
)
def test_out_of_range_loop_settings_are_refused(flag, value):
    """These were accepted and trained: a one-line error naming the setting now."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(flag)} must be "):
        load_config(preset="tiny", overrides=[f"--{flag}", value])


@pytest.mark.parametrize(
    ("preset", "flag", "value"),
    [
        ("llama-tiny", "model.rope_theta", "inf"),  # every rotary frequency 0: no positional information at all
        ("llama-tiny", "model.norm_eps", "inf"),  # every normalised activation 0
        ("tiny", "model.init_std", "inf"),  # non-finite weights from the start
        ("bert-tiny", "model.norm_eps", "inf"),
        ("bert-tiny", "model.init_std", "inf"),
        ("lstm-tiny", "model.init_std", "inf"),
        ("tiny", "model.norm_eps", "nan"),
    ],
)
def test_non_finite_model_settings_are_refused(preset, flag, value):
    """Like `train.lr inf`, a model setting that is not a finite number is a one-line error naming it (these
    were accepted and trained)."""
    with pytest.raises(ConfigError, match=rf"^{re.escape(flag)} must be a number .*, got {value}$"):
        load_config(preset=preset, overrides=[f"--{flag}", value])


@pytest.mark.parametrize(("tokenizer", "least"), [("bpe", 257), ("wordpiece", 64), ("unigram", 281)])
def test_a_too_small_prepare_vocabulary_names_the_flag_to_change(tokenizer: str, least: int) -> None:
    """prepare's vocabulary floor names `--vocab-size`, the flag a user types, and the smallest size allowed."""
    from lmforge.data.prepare import PrepareConfig

    with pytest.raises(ConfigError, match=rf"^--vocab-size must be >= {least} .*got 50$"):
        PrepareConfig(inputs=["x.txt"], out="o", tokenizer=tokenizer, vocab_size=50)
    PrepareConfig(inputs=["x.txt"], out="o", tokenizer=tokenizer, vocab_size=least)


def test_an_odd_rotary_head_dim_says_what_to_change():
    # it said only "rotary positions need an even head_dim", naming no setting
    with pytest.raises(
        ConfigError, match=r"model.d_model 66 / model.n_head 2 = 33; pick a model.d_model or model.n_head"
    ):
        load_config(
            preset="llama-tiny", overrides=["--model.d_model", "66", "--model.n_head", "2", "--model.n_kv_head", "1"]
        )


def test_finetune_says_where_another_section_comes_from():
    # `finetune ... --data.dir D` was told "the model comes from BASE"
    from lmforge.finetune import finetune_sections

    for section, where in [("model", "the model comes from BASE"), ("data", "the data comes from --train FILE")]:
        with pytest.raises(ConfigError, match=rf"not --{section}\.\*; {where}"):
            finetune_sections("full", {section: {"x": 1}})


def test_a_tilde_the_shell_left_is_the_home_folder(tmp_path, monkeypatch):
    """`dir = "~/data"` in a TOML file, `--data.dir=~/d` and `--config=~/c.toml` (the shell expands no `~` there)
    named a folder called "~" under the current one ("not found")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.toml").write_text('out = "~/runs/a"\n[data]\ndir = "~/data"\n', encoding="utf-8")
    cfg = load_config(config_file="~/c.toml")
    assert (cfg.data.dir, cfg.out) == (str(tmp_path / "data"), str(tmp_path / "runs" / "a"))
    assert load_config(overrides=["--data.dir=~/d"]).data.dir == str(tmp_path / "d")
    assert load_config(overrides=["--data.dir", "rel/~x"]).data.dir == "rel/~x"
    from lmforge.data.mixture import parse_mix  # data.mix's directories too (they were "~/web" under the current one)

    assert parse_mix("~/web=3, books=1") == [(str(tmp_path / "web"), 0.75), ("books", 0.25)]


def test_min_lr_0_decays_to_zero_and_unset_means_lr_over_10(tmp_path):
    """--train.min_lr 0 meant lr / 10, so a decay to exactly zero could not be configured."""
    from lmforge.train.schedule import lr_at

    zero = load_config(overrides=["--train.min_lr", "0", "--train.max_steps", "10", "--train.warmup_steps", "0"])
    assert zero.train.min_lr == 0 and zero.train.final_lr == 0
    t = zero.train
    kwargs = dict(lr=t.lr, final_lr=t.final_lr, warmup_steps=0, max_steps=10, schedule="cosine")
    assert lr_at(10, **kwargs) == 0 and lr_at(9, **kwargs) > 0
    unset = load_config(overrides=["--train.lr", "1e-3"]).train
    assert unset.min_lr is None and unset.final_lr == pytest.approx(1e-4)
    assert load_config(preset="small", overrides=["--train.min_lr", "none"]).train.final_lr == pytest.approx(1e-4)
    (tmp_path / "zero.toml").write_text("[train]\nmin_lr = 0\n", encoding="utf-8")
    assert load_config(config_file=tmp_path / "zero.toml").train.final_lr == 0


def test_a_config_saved_when_min_lr_0_meant_lr_over_10_is_read_so(tmp_path):
    """A config.json / state.json config without config_version was written when min_lr 0 meant lr / 10: eval,
    `finetune --schedule continue` and `--config RUN` read it so; one with the version keeps an explicit 0."""
    old = load_config(overrides=["--train.lr", "1e-3"]).to_dict()
    del old["config_version"]
    old["train"]["min_lr"] = 0.0
    assert config_from_json(old, where="state.json").train.final_lr == pytest.approx(1e-4)
    (tmp_path / "config.json").write_text(json.dumps(old), encoding="utf-8")
    assert load_config(config_file=tmp_path).train.final_lr == pytest.approx(1e-4)
    new = load_config(overrides=["--train.lr", "1e-3", "--train.min_lr", "0"]).to_dict()
    assert new["config_version"] == 2 and config_from_json(new, where="state.json").train.final_lr == 0


@pytest.mark.parametrize("key", ["curriculum_steps", "curriculum_start"])
def test_curriculum_settings_without_a_curriculum_are_refused(tmp_path, key):
    """--data.curriculum_steps / --data.curriculum_start without --data.curriculum were accepted and ignored."""
    value = "500" if key == "curriculum_steps" else "0.5"
    refused = (
        f"data.{key} is used by data.curriculum doc_length only, and this run has none; drop it, or pass "
        "--data.curriculum doc_length$"
    )
    with pytest.raises(ConfigError, match=f"^{refused}"):
        load_config(preset="tiny", overrides=[f"--data.{key}", value])
    toml = tmp_path / "run.toml"
    toml.write_text(f"[data]\n{key} = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))}: {refused}"):
        load_config(preset="tiny", config_file=toml)
    assert load_config(preset="tiny", overrides=["--data.curriculum", "doc_length", f"--data.{key}", value])
    (tmp_path / "config.json").write_text(json.dumps(load_config(preset="tiny").to_dict()), encoding="utf-8")
    assert load_config(config_file=tmp_path).data.curriculum == "none"  # a run's config.json lists every key


def test_a_refusal_names_the_config_file_that_set_the_refused_key(tmp_path):
    """`--config configs/nanogpt-baby-cpu.toml --train.schedule constant` was refused for the file's min_lr with no
    word of the file, so the user looked for a flag they never typed."""
    shipped = Path(__file__).parent.parent / "configs" / "nanogpt-baby-cpu.toml"
    said = f"^{re.escape(str(shipped))} and --train.schedule: train.min_lr is not used by train.schedule"
    with pytest.raises(ConfigError, match=said):
        load_config(config_file=shipped, overrides=["--train.schedule", "constant"])
    with pytest.raises(ConfigError, match="^train.min_lr is not used"):  # typed as a flag: the user knows
        load_config(config_file=shipped, overrides=["--train.schedule", "constant", "--train.min_lr", "1e-4"])
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nlr = "fast"\n[optim]\nbeta2 = 0.99\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))}: train.lr: expected float, got 'fast'$"):
        load_config(config_file=toml)
    toml.write_text("[optim]\nbeta2 = 0.99\n", encoding="utf-8")  # (a flag no longer hides the file's bad lr)
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))} and --optim.name: optim.beta2 is not used by"):
        load_config(config_file=toml, overrides=["--optim.name", "sgd", "--train.lr", "1e-3"])


def test_a_refusal_about_a_flag_names_the_flag_not_only_the_file_that_set_the_other_value(tmp_path):
    """`--config c.toml --model.n_head 3` with d_model 64 in c.toml was refused as "c.toml: model.d_model (64) must
    be divisible by model.n_head (3)", so the user searched the file for the 3 they had typed."""
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nd_model = 64\n", encoding="utf-8")
    said = f"^{re.escape(str(toml))} and --model.n_head: model.d_model \\(64\\) must be divisible by model.n_head"
    with pytest.raises(ConfigError, match=said):
        load_config(config_file=toml, preset="tiny", overrides=["--model.n_head", "3"])
    with pytest.raises(ConfigError, match="^model.d_model \\(66\\) must be divisible"):  # both typed: no prefix
        load_config(config_file=toml, preset="tiny", overrides=["--model.n_head", "4", "--model.d_model", "66"])


def test_early_stopping_that_can_never_stop_the_run_is_refused():
    """Patience 3 with evaluations at steps 4 and 8 of 10 could never stop anything (the first evaluation sets
    the reference, so it needs 4 before the last step): accepted and silently inert."""
    flags = ["--train.max_steps", "10", "--eval.every", "4", "--train.early_stop_patience"]
    with pytest.raises(
        ConfigError,
        match=r"^train.early_stop_patience 3 can never stop this run: it needs 4 evaluations before train.max_steps "
        r"10, and eval.every 4 runs 2; lower --eval.every or --train.early_stop_patience, or drop it$",
    ):
        load_config(preset="tiny", overrides=[*flags, "3"])
    with pytest.raises(ConfigError, match="^train.early_stop_patience 2 can never stop"):  # 2 needs 3: at 4, 8, 12
        load_config(preset="tiny", overrides=["--train.max_steps", "12", *flags[2:], "2"])
    assert load_config(preset="tiny", overrides=[*flags, "1"]).train.early_stop_patience == 1  # stops at 8 at best
    assert load_config(preset="tiny", overrides=["--train.max_steps", "13", *flags[2:], "2"])


def test_a_wandb_project_without_wandb_is_refused(tmp_path):
    """--log.wandb_project without --log.wandb was accepted and ignored (pretrain, finetune, TOML)."""
    from lmforge.finetune import finetune_sections

    refused = (
        "log.wandb_project names the Weights & Biases project of log.wandb, which is off; pass --log.wandb or drop it$"
    )
    with pytest.raises(ConfigError, match=f"^{refused}"):
        load_config(preset="tiny", overrides=["--log.wandb_project", "mine"])
    toml = tmp_path / "run.toml"
    toml.write_text('[log]\nwandb_project = "mine"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(toml))}: {refused}"):
        load_config(preset="tiny", config_file=toml)
    with pytest.raises(ConfigError, match=f"^{refused}"):
        finetune_sections("full", {"log": {"wandb_project": "mine"}})
    assert load_config(preset="tiny", overrides=["--log.wandb", "--log.wandb_project", "mine"]).log.wandb_project
    assert finetune_sections("full", {"log": {"wandb": True, "wandb_project": "mine"}})[4].wandb_project == "mine"
