"""Each setting is declared once: the command line, TOML files, config.json and the README come from it."""

from pathlib import Path

import pytest

from gptrain.config import SECTIONS, Config, build_config, readme_with_settings
from gptrain.errors import UserError
from gptrain.settings import declaration, declared_fields, flags_of

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_flag_table_is_the_declarations():
    text = README.read_text()
    assert readme_with_settings(text) == text, "README's settings table is stale: run python -m gptrain.config --readme"


def test_every_field_of_every_section_is_declared_and_flags_are_unique():
    seen: dict[str, str] = {}
    for name, cls in SECTIONS.items():
        for f in declared_fields(cls):
            s = declaration(f)
            assert s.help, f"{name}.{f.name} has no help"
            for flag in (*flags_of(f), *([s.negate] if s.negate else [])) if s.cli else ():
                assert flag not in seen, f"{flag} declared by {seen.get(flag)} and {name}.{f.name}"
                seen[flag] = f"{name}.{f.name}"
        import dataclasses

        assert len(declared_fields(cls)) == len(dataclasses.fields(cls)), f"undeclared field in {name}"


def test_config_json_round_trips_and_old_names_are_mapped():
    cfg, _ = build_config({"optim.lr": 1e-3, "tracking.wandb_tags": ["a"]})
    assert Config.from_dict(cfg.to_dict()) == cfg
    old = cfg.to_dict()
    old["tracking"]["sample_tokens"] = 32  # a setting of older versions, merged into train.sample_tokens
    assert Config.from_dict(old) == cfg


def test_a_new_declared_field_becomes_a_flag_and_a_toml_key(tmp_path, monkeypatch):
    """What the Development section promises: one field, and the flag, TOML key and checks follow."""
    import dataclasses

    from gptrain import cli, config
    from gptrain.settings import setting

    @dataclasses.dataclass
    class Extra:
        knob: float = setting(0.5, "a new knob", ge=0, le=1)

    monkeypatch.setitem(config.SECTIONS, "extra", Extra)
    monkeypatch.setattr(config, "PATHS", config.PATHS + ["extra.knob"])
    parser = cli.Parser(prog="t")
    cli.add_config_options(parser)
    args = parser.parse_args(["--knob", "0.25"])
    assert cli.collect_overrides(args) == {"extra.knob": "0.25"}
    assert config.flatten_toml({"extra": {"knob": 0.75}}, "f.toml") == {"extra.knob": 0.75}
    from gptrain.settings import check_value, coerce

    field = dataclasses.fields(Extra)[0]
    assert coerce(Extra, "knob", "0.25", "x") == 0.25
    with pytest.raises(UserError, match=r"--knob must be in \[0, 1\], got 2"):
        check_value(Extra, field, 2.0, "--knob")
