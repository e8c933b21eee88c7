"""Command lines of train.py and eval.py: every numeric flag is range-checked when it is parsed.

A bad value is argparse's usage error (exit code 2) naming the flag and its allowed range, before any
work and without a traceback, instead of a ZeroDivisionError or a silent empty run later.
"""
import dataclasses

import pytest

import eval as ris_eval
import runtime
import train

PARSERS = {"train.py": (runtime.build_parser(train.PRESETS["demo"], train.PRESETS, train.__doc__), train.main),
           "eval.py": (ris_eval.build_parser(), ris_eval.main)}


def numeric_flags(parser):
    """(flag, NumberRange) of every option whose value is converted to a number."""
    return [(a.option_strings[0], a.type) for a in parser._actions if isinstance(a.type, runtime.NumberRange)]


def bad_values(allowed: runtime.NumberRange) -> list[str]:
    """A non-number, and each bound's first value outside it."""
    values = ["ten", "nan"] + ([str(allowed.min - 1)] if allowed.min is not None else [])
    values += [str(v) for v in (allowed.above, allowed.below) if v is not None]
    return values + ([str(allowed.max + 1)] if allowed.max is not None else [])


def test_every_numeric_option_has_a_range():
    for name, (parser, _) in PARSERS.items():
        plain = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
        assert not plain, f"{name}: numeric flags without a NumberRange: {plain}"
    typed = {flag for flag, _ in numeric_flags(PARSERS["train.py"][0])}
    knobs = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(train.TrainConfig) if f.type in ("int", "float")}
    assert typed == knobs and {"--epochs", "--lr"} <= knobs


@pytest.mark.parametrize("program", PARSERS)
def test_every_numeric_flag_rejects_a_bad_value_naming_flag_and_range(program, capsys):
    parser, main = PARSERS[program]
    flags = numeric_flags(parser)
    assert flags
    for flag, allowed in flags:
        assert f"[{allowed}]" in " ".join(parser.format_help().split()), flag  # --help shows the range
        for value in bad_values(allowed):
            with pytest.raises(SystemExit) as exit_info:
                main([flag, value])
            err = capsys.readouterr().err
            assert exit_info.value.code == 2, (flag, value)
            assert err.strip().splitlines()[-1].endswith(f"error: argument {flag}: must be {allowed}, got '{value}'")
            assert "Traceback" not in err


def test_the_values_that_crashed_are_usage_errors(capsys):
    """--images-per-batch 0 ended in a ZeroDivisionError, --sentences-per-image 0 in "need at least one array
    to stack", --epochs 0 trained nothing and said nothing; eval.py's --batch-size 0 alike."""
    for main, flag in ((train.main, "--images-per-batch"), (train.main, "--sentences-per-image"),
                       (train.main, "--epochs"), (ris_eval.main, "--batch-size")):
        with pytest.raises(SystemExit) as exit_info:
            main([flag, "0"])
        assert exit_info.value.code == 2
        assert f"error: argument {flag}: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_stage1_longer_than_the_run_is_refused_unless_sam_is_off(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--epochs", "4", "--stage1-epochs", "5"])
    assert exit_info.value.code == 2
    assert "--stage1-epochs 5 > --epochs 4: stage 2 (§4.2) would never run" in capsys.readouterr().err
    assert train.parse_args(["--epochs", "4", "--stage1-epochs", "4"]).stage1_epochs == 4  # stage 1 only
    assert train.parse_args(["--epochs", "4", "--stage1-epochs", "5", "--no-use-sam"]).epochs == 4


def test_in_range_values_parse_to_numbers():
    tc = train.parse_args(["--prompt-dropout", "0", "--lr", "3e-4", "--seed", str(2**32 - 1), "--epochs", "1",
                           "--stage1-epochs", "1"])
    assert (tc.prompt_dropout, tc.lr, tc.seed, tc.epochs) == (0.0, 3e-4, 2**32 - 1, 1)
    assert ris_eval.parse_args(["--batch-size", "1", "--max-vis", "0"]).batch_size == 1
