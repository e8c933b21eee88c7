"""Tokenizer: id-for-id parity with OpenAI's tokenizer (open_clip's copy of it, run with ftfy and regex)
on generated referring expressions and hard cases, both vocabulary formats, and the byte fallback."""
import importlib.util
import json
import os
import random
import unicodedata

import pytest
import torch

import clip_vit
from clip_vit import Tokenizer


def open_clip_file(name):
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    return os.path.join(spec.submodule_search_locations[0], name)


@pytest.fixture(scope="module")
def oracle():
    """open_clip/tokenizer.py (OpenAI's SimpleTokenizer with ftfy + regex), loaded alone: importing the
    open_clip package would import torchvision."""
    pytest.importorskip("ftfy")
    pytest.importorskip("regex")
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer", open_clip_file("tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(open_clip_file("bpe_simple_vocab_16e6.txt.gz"))


@pytest.fixture(scope="module")
def ours():
    return Tokenizer(open_clip_file("bpe_simple_vocab_16e6.txt.gz"))


def referring_expressions(n, seed=0):
    rng = random.Random(seed)
    colours = ["red", "blue", "light-green", "dark grey", "white", "Black", "YELLOW", "orange-ish", "pink"]
    objects = ["man", "woman's bag", "giraffe", "zebra", "umbrella", "bowl of soup", "laptop", "guy", "kid",
               "teddy bear", "donut", "sheep", "motorcycle", "tv", "skateboarder", "elephant"]
    places = ["left", "right", "middle", "top-left corner", "bottom", "front", "back", "far right", "center"]
    templates = [
        "the {c} {o} on the {p}", "{o} {p}", "{n} {o}s", "{o} that's {p} of the {o2}", "the {o}'s {c} hat",
        "{c} {o} #{n}", "second {o} from the {p}", "{o} (partially hidden) , {p}", "{o} w/ {c} shirt!!",
        "it's the {o} we'll see at {n}:{n2} pm", "{o} - {n}% visible; {p}", "they're next to {o2}'s {o}",
        "\"{o}\" closest to the camera", "{o} i'd say {p}", "{o}s ... {p}?", "{o}@{p} {n}.{n2}m",
    ]
    for _ in range(n):
        yield rng.choice(templates).format(
            c=rng.choice(colours), o=rng.choice(objects), o2=rng.choice(objects), p=rng.choice(places),
            n=rng.randint(0, 2000), n2=rng.randint(0, 99))


HARD_CASES = [
    "", "   ", "a", "Café naïve façade résumé", "cafe\u0301 (decomposed accent)", "ÉCOLE Ñandú",
    "dog 🐶 next to 🚗🚕", "👨‍👩‍👧 family emoji", "红色的汽车 in the 左边", "日本語のテキスト", "한국어 문장",
    "the man’s ‘quoted’ “phrase” „low“", "left &amp; right &lt;b&gt; &quot;x&quot; &#39;y&#39; &#x41;",
    "&amp;amp;lt; double escaped", "AT&T and this&not that", "&EACUTE;COLE", "<b>bold</b> &amp; more",
    "tabs\tand\nnew\r\nlines  and   spaces\u00a0nbsp\u2003em\u3000ideographic", "ﬁne ﬂowers ﬀ ĳ",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ １２３", "ｶﾀｶﾅ halfwidth", "x² + ½ + Ⅻ + ٣ + ௰ + ①", "一二三 numbers in CJK",
    "mixed123numbers456", "it'S THE MAN'S, THEY'RE", "it'ſ long s", "\x1b[31mred\x1b[0m terminal",
    "control\x00chars\x07here\ufeff", "c1 \x93quoted\x94 \x85 \x81", "greek αβγ ΑΒΓ ς", "İstanbul ǅ Ǆ",
    "arabic مرحبا hebrew שלום", "devanagari नमस्ते", "combining a\u0308 o\u0303", "zero\u200bwidth joiner\u200d",
    "punct!!! ??? ... --- ___ *** ^^^", "'quotes at 'start' and end'", "'s 't 're 've 'm 'll 'd",
    " ".join(["word"] * 100), "antidisestablishmentarianism" * 5, "a\u2028b\u2029c", "cr\ronly",
    "paired \ud83d\udc36 surrogates", "lone \ud800 surrogate", "&#x1F600; &#128512; &nbsp;&copy; &#0; &#xD800;",
    "a < b &amp; c\nnext line &amp; d", "first &amp;\nthen <tag> &amp;", "tab\t\t\ttab", "\n\n\n",
]


def assert_same_ids(ours, oracle, texts):
    expected, got = oracle(texts, context_length=77), ours(texts)
    bad = [t for t, e, g in zip(texts, expected, got) if not torch.equal(e, g)]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]}"


def test_generated_referring_expressions_match_openai(ours, oracle):
    assert_same_ids(ours, oracle, list(referring_expressions(3000)))


def test_hard_cases_match_openai(ours, oracle):
    assert_same_ids(ours, oracle, HARD_CASES)


def test_fix_text_matches_ftfy_on_hard_cases():
    ftfy = pytest.importorskip("ftfy")
    for text in HARD_CASES:
        assert clip_vit.fix_text(text) == ftfy.fix_text(text), repr(text)


def test_truncation_keeps_eot_last(ours, oracle):
    text = "the very long description " * 30
    tokens = ours(text)
    assert tokens.shape == (1, 77) and tokens[0, -1] == ours.eot_token_id and tokens[0, 0] == ours.sot_token_id
    assert_same_ids(ours, oracle, [text])


def test_empty_text_is_sot_eot(ours):
    assert ours("")[0, :3].tolist() == [49406, 49407, 0]


def test_pretokenizer_matches_openais_regex_pattern_on_every_code_point():
    r"""Around every code point c Python's unicodedata knows (assigned, not a surrogate), the stdlib pattern
    splits text exactly as OpenAI's `regex` pattern with \p{L} / \p{N} and IGNORECASE. "a" + c tells a
    letter from the rest, c + c a number from other symbols, "'" + c + "e" a contraction (under IGNORECASE
    'ſ is 's) from an apostrophe before a letter; whitespace and U+0345 (dropped) leave no token of c. No
    token spans a space, so the texts of 1024 code points at a time are split as one."""
    regex = pytest.importorskip("regex")
    openai = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
                           regex.IGNORECASE)
    ours = clip_vit._pretokenizer()
    texts = [(hex(cp), f"a{chr(cp)}{chr(cp)}'{chr(cp)}e") for cp in range(0x110000)
             if unicodedata.category(chr(cp)) not in ("Cn", "Cs")]
    wrong = []
    for i in range(0, len(texts), 1024):
        chunk = texts[i: i + 1024]
        joined = " ".join(text for _, text in chunk)
        if ours.findall(joined) != openai.findall(joined):
            wrong += [cp for cp, text in chunk if ours.findall(text) != openai.findall(text)]
    assert not wrong, wrong[:20]


def test_hugging_face_vocab_files_give_the_same_ids(ours, oracle, tmp_path):
    """vocab.json + merges.txt written in Hugging Face's CLIPTokenizer layout from OpenAI's file."""
    vocab = dict(oracle.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merges = sorted(oracle.bpe_ranks, key=oracle.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                         encoding="utf-8")
    texts = list(referring_expressions(300, seed=1)) + HARD_CASES
    for path in (tmp_path, tmp_path / "vocab.json", tmp_path / "merges.txt"):
        assert torch.equal(Tokenizer(path)(texts), ours(texts))
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))  # the files follow HF's conventions
    plain = list(referring_expressions(100, seed=2))
    assert hf(plain)["input_ids"] == [[49406, *ours.encode(t), 49407] for t in plain]


def test_byte_fallback_uses_openais_byte_ids(oracle):
    fallback = Tokenizer()
    enc = oracle.encoder
    expected = [49406, enc["r"], enc["e"], enc["d</w>"], enc["c"], enc["a"], enc["r</w>"],
                enc["\u00c3"], enc["\u00a9</w>"], enc["'"], enc["s</w>"], 49407]  # é = bytes c3 a9
    assert fallback("red car é's")[0, :12].tolist() == expected
    assert fallback(" ".join(HARD_CASES))[0, 1:-1].max() < 512


def test_missing_or_malformed_vocabulary_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        Tokenizer(tmp_path / "nope.gz")
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bad.gz"):
        Tokenizer(tmp_path / "bad.gz")
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        Tokenizer(tmp_path / "vocab.json")


def test_a_deeply_nested_vocab_json_names_the_file(tmp_path):
    (tmp_path / "vocab.json").write_text("[" * 100_000)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="vocab.json: not a JSON vocabulary \\(RecursionError"):
        Tokenizer(tmp_path / "vocab.json")
