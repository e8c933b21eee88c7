"""README "Reproducing the paper": every command of its table yields the configuration its row means,
and every train command runs (a few steps on the built-in data), so the table cannot rot."""
import json
import os
import re
import shlex
from dataclasses import asdict

import pytest

import eval as ris_eval
import train

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")

FULL = {"cmp": "both", "icl": True, "use_sam": True, "seen_only": False, "prompts": "mask,point,text"}
CLIP_ONLY = FULL | {"use_sam": False}
REFCOCO_VAL = {"splits": None, "dataset": "refcoco", "split": "val", "subset": "all", "output": "mask", "prompts": None}
COARSE = REFCOCO_VAL | {"output": "coarse"}
SPLITS_ALL = {"splits": "all", "dataset": None, "split": None, "subset": "all", "output": "mask", "prompts": None}

# row of the README table -> (the TrainConfig fields it sets, the eval.py flags it uses)
ROWS = {
    "Table 1, Ours": (FULL, SPLITS_ALL),
    "Table 2, Ours, seen": (FULL | {"seen_only": True}, SPLITS_ALL | {"subset": "seen"}),
    "Table 2, Ours, unseen": (FULL | {"seen_only": True}, SPLITS_ALL | {"subset": "unseen"}),
    "Table 3, row 1: CLIP": (CLIP_ONLY | {"cmp": "none", "icl": False}, COARSE),
    "Table 3, row 2: CLIP + CMP": (CLIP_ONLY | {"icl": False}, COARSE),
    "Table 3, row 3: CLIP + CMP + ICL": (CLIP_ONLY, COARSE),
    "Table 3, row 4: CLIP + CMP + SAM": (FULL | {"icl": False}, REFCOCO_VAL),
    "Table 3, row 5: CLIP + CMP + ICL + SAM": (FULL, REFCOCO_VAL),
    "Table 4, Baseline": (CLIP_ONLY | {"cmp": "none", "icl": False}, COARSE),
    "Table 4, V2LP": (CLIP_ONLY | {"cmp": "v2l", "icl": False}, COARSE),
    "Table 4, L2VP": (CLIP_ONLY | {"cmp": "l2v", "icl": False}, COARSE),
    "Table 4, CMP": (CLIP_ONLY | {"icl": False}, COARSE),
    **{f"Table 5, {name}": (FULL, REFCOCO_VAL | {"prompts": prompts}) for name, prompts in (
        ("no prompt", "none"), ("mask", "mask"), ("point", "point"), ("text", "text"), ("mask + point", "mask,point"),
        ("mask + text", "mask,text"), ("point + text", "point,text"), ("mask + point + text", "mask,point,text"))},
    "§4.4, w/o ICL": (FULL | {"icl": False}, REFCOCO_VAL),
    "§4.4, w/ ICL": (FULL, REFCOCO_VAL),
}
INPUTS = ("out", "clip_weights", "sam_weights", "vocab", "data_root")  # where the files are, not what runs


def readme_table():
    """({row: (train argv, eval argv, paper cell)}, the $PAPER flags) from the README section."""
    with open(README) as f:
        text = f.read()
    section = text.split("## Reproducing the paper\n", 1)[1].split("\n## ", 1)[0]
    paper = re.search(r'^PAPER="(.*)"$', section, re.M).group(1)
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("row", "---"):
            continue
        commands = [re.fullmatch(r"`(.*)`", c).group(1).replace("$PAPER", paper) for c in cells[1:3]]
        rows[cells[0]] = (*map(shlex.split, commands), cells[3])
    return rows, shlex.split(paper)


TABLE, PAPER_FLAGS = readme_table()


def test_readme_table_has_every_row_of_the_paper():
    assert list(TABLE) == list(ROWS)


@pytest.mark.parametrize("row", list(ROWS))
def test_readme_commands_yield_the_rows_configuration(row):
    train_argv, eval_argv, _ = TABLE[row]
    want_train, want_eval = ROWS[row]
    assert train_argv[:2] == ["python", "train.py"] and eval_argv[:2] == ["python", "eval.py"]
    tc = train.parse_args(train_argv[2:])
    assert {k: getattr(tc, k) for k in want_train} == want_train
    paper = asdict(train.PRESETS["paper"])
    unchanged = {k: v for k, v in asdict(tc).items() if k not in want_train and k not in INPUTS}
    assert unchanged == {k: paper[k] for k in unchanged}  # the paper's values (§4.2) everywhere else
    assert tc.data_root == "DATA_ROOT" and tc.clip_weights and tc.sam_weights and tc.vocab
    args = ris_eval.parse_args(eval_argv[2:])
    assert {k: getattr(args, k) for k in want_eval} == want_eval
    assert args.checkpoint == tc.out and args.data_root == "DATA_ROOT"  # evaluates the run it trains
    assert tc.use_sam or args.output == "coarse"  # a --no-use-sam run has no SAM mask


def test_readme_paper_numbers_of_tables_1_and_2_are_evals():
    numbers = {row: [float(x) for x in re.findall(r"\d+\.\d+", cell)] for row, (_, _, cell) in TABLE.items()}
    assert numbers["Table 1, Ours"] == [*ris_eval.PAPER_TABLE1["oIoU"].values(), *ris_eval.PAPER_TABLE1["mIoU"].values()]
    for subset in ("seen", "unseen"):
        assert numbers[f"Table 2, Ours, {subset}"] == list(ris_eval.PAPER_TABLE2[subset].values())


def on_builtin_data(argv, root, out):
    """A README train command with the paper's inputs swapped for the micro built-in data: 2 steps of
    stage 1 (coarse mask), then 1 step of stage 2 (end to end)."""
    assert argv[2:2 + len(PAPER_FLAGS)] == PAPER_FLAGS
    flags = argv[2 + len(PAPER_FLAGS):]
    flags[flags.index("--out") + 1] = out
    return ["--config", "demo", "--data-root", root, "--clip-size", "32", "--sam-size", "32", "--images-per-batch",
            "4", "--sentences-per-image", "2", "--epochs", "2", "--stage1-epochs", "1", "--max-steps", "3",
            "--log-every", "1", *flags]


RUN_CONFIGS = {row: asdict(train.parse_args(TABLE[row][0][2:])) for row in ROWS if row in TABLE}
DISTINCT_RUNS = [row for i, row in enumerate(RUN_CONFIGS)  # rows that share a run (the same configuration): once
                 if all(RUN_CONFIGS[row] != RUN_CONFIGS[other] for other in list(RUN_CONFIGS)[:i])]


@pytest.mark.parametrize("row", DISTINCT_RUNS)
def test_readme_train_command_runs_on_builtin_data(row, micro_root, tmp_path):
    want, _ = ROWS[row]
    out = str(tmp_path / "run")
    result = train.main(on_builtin_data(TABLE[row][0], micro_root, out))
    assert result["step"] == 3 and result["metrics"]["output"] == ("mask" if want["use_sam"] else "coarse")
    with open(os.path.join(out, "config.json")) as f:
        saved = json.load(f)["train"]
    assert {k: saved[k] for k in want} == want
    with open(os.path.join(out, "log.jsonl")) as f:
        terms = [set(record) for record in map(json.loads, f) if "loss" in record]  # training steps, not "val"
    assert [("icl_clip" in t, "icl_sam" in t, "sam_seg" in t) for t in terms] == [
        (want["icl"], False, False), (want["icl"], False, False), (want["icl"], want["icl"] and want["use_sam"],
                                                                   want["use_sam"])]
    with open(os.path.join(out, "train.log")) as f:
        assert ("--seen-only: 0 training refs" in f.read()) == want["seen_only"]  # synth shapes are all seen
