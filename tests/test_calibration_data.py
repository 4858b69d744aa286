"""qoq.calibration: local text / jsonl / folders / WikiExtractor, data-free, auto, and errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from qoq.calibration import CalibrationSet, load_calibration
from qoq.calibration.data import check_calibration_path
from qoq.errors import QoqError, flags

PARAGRAPHS = [
    "The river runs through the valley, past the mill and the old stone bridge, down to the sea.",
    "Every year the village holds a fair with music, games, and a long table full of bread and fruit.",
    "Scientists measured the temperature of the lake each morning for three years and found a trend.",
    "A small robot rolled across the floor, stopped at the wall, turned left, and rolled on again.",
    "The library opened a new room for children, with low shelves, bright lamps and soft chairs.",
    "In winter the roads close, so the people store food in autumn and tell stories by the fire.",
    "The committee approved the budget after a long discussion about schools, roads and parks.",
    "Numbers like 3, 17, 256 and 1024 appear in the report, together with a table of averages.",
    "She planted tomatoes, beans and sunflowers, and by August the garden was taller than the fence.",
    "The orchestra played the final movement slowly, and the hall was silent for a moment after.",
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text("\n\n".join(PARAGRAPHS) + "\n", encoding="utf-8")
    return p


def _check(cs: CalibrationSet, n: int, seqlen: int, vocab: int):
    assert isinstance(cs, CalibrationSet)
    assert cs.input_ids.shape == (n, seqlen) and cs.input_ids.dtype == torch.long
    assert int(cs.input_ids.min()) >= 0 and int(cs.input_ids.max()) < vocab
    assert cs.sha256 == hashlib.sha256(cs.input_ids.contiguous().numpy().tobytes()).hexdigest()
    assert "\n" not in cs.description and f"{n} x {seqlen} tokens" in cs.description


def test_text_file(tok, text_file):
    a = load_calibration(str(text_file), tok, n_samples=4, seqlen=16)
    _check(a, 4, 16, len(tok))
    assert "local text" in a.description and str(text_file) in a.description and "10 documents" in a.description
    b = load_calibration(str(text_file), tok, n_samples=4, seqlen=16)
    assert a.sha256 == b.sha256 and torch.equal(a.input_ids, b.input_ids)
    c = load_calibration(str(text_file), tok, n_samples=4, seqlen=16, seed=7)
    assert c.sha256 != a.sha256


def test_samples_are_the_text_without_special_tokens(tok, text_file):
    cs = load_calibration(str(text_file), tok, n_samples=2, seqlen=16)
    assert tok.bos_token_id not in cs.input_ids.tolist()[0]
    decoded = tok.decode(cs.input_ids.flatten().tolist())
    assert any(decoded[:20] in p for p in PARAGRAPHS)


def test_jsonl(tok, tmp_path):
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "meta": i}) for i, t in enumerate(PARAGRAPHS)) + "\n\n")
    cs = load_calibration(str(p), tok, n_samples=3, seqlen=20)
    _check(cs, 3, 20, len(tok))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(QoqError, match=r"bad.jsonl:2"):
        load_calibration(str(bad), tok, n_samples=1, seqlen=8)
    no_text = tmp_path / "no_text.jsonl"
    no_text.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(QoqError, match="text"):
        load_calibration(str(no_text), tok, n_samples=1, seqlen=8)


def test_folder(tok, tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("\n\n".join(PARAGRAPHS[:4]))
    (folder / "sub" / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in PARAGRAPHS[4:8]))
    (folder / "sub" / "c.utf8").write_text("\n\n".join(PARAGRAPHS[8:]))
    (folder / "README.md").write_text("# not calibration text\n" * 50)
    cs = load_calibration(str(folder), tok, n_samples=5, seqlen=16)
    _check(cs, 5, 16, len(tok))
    assert "3 files" in cs.description and "10 documents" in cs.description
    assert load_calibration(str(folder), tok, n_samples=5, seqlen=16).sha256 == cs.sha256
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(QoqError, match="has no"):
        load_calibration(str(empty), tok, n_samples=1, seqlen=8)


def test_wikiextractor_file(tok, tmp_path):
    p = tmp_path / "wiki.utf8"
    p.write_text("".join(f'<doc id="{i}" url="https://x/?curid={i}" title="T{i}">\nT{i}\n\n{t}\n\n</doc>\n'
                         for i, t in enumerate(PARAGRAPHS)))
    cs = load_calibration(str(p), tok, n_samples=6, seqlen=16)
    _check(cs, 6, 16, len(tok))
    assert "10 documents" in cs.description
    text = tok.decode(cs.input_ids.flatten().tolist())
    assert "<doc" not in text and "</doc>" not in text and "curid" not in text


def test_shared_wiki_utf8(tok, shared_data_dir):
    wiki = shared_data_dir / "calibration" / "exllamav2-standard_cal_data" / "wiki.utf8"
    if not wiki.is_file():
        pytest.skip(f"{wiki} missing")
    cs = load_calibration(str(wiki), tok, n_samples=8, seqlen=64)
    _check(cs, 8, 64, len(tok))
    assert "2349 documents" in cs.description


def test_not_enough_text(tok, text_file):
    with pytest.raises(QoqError) as err:
        load_calibration(str(text_file), tok, n_samples=100, seqlen=64)
    msg = str(err.value)
    assert "\n" not in msg and "tokens" in msg and "lower n_samples/seqlen or pass more data as spec" in msg
    with pytest.raises(QoqError) as err, flags({"n_samples": "--calib-samples", "seqlen": "--calib-seqlen"}):
        load_calibration(str(text_file), tok, n_samples=100, seqlen=64)
    assert "lower --calib-samples/--calib-seqlen" in str(err.value)


def test_bad_arguments(tok, text_file, tmp_path):
    with pytest.raises(QoqError, match="n_samples must be >= 1"):
        load_calibration(str(text_file), tok, n_samples=0, seqlen=16)
    with pytest.raises(QoqError, match="seqlen must be >= 8"):
        load_calibration(str(text_file), tok, n_samples=1, seqlen=4)
    with pytest.raises(QoqError, match="does not exist"):
        load_calibration(str(tmp_path / "nope.txt"), tok, n_samples=1, seqlen=8)
    with pytest.raises(QoqError, match="no model"):
        load_calibration("data-free", tok, n_samples=1, seqlen=8)


@pytest.mark.parametrize("name", ["pileval", "wikitext2"])
def test_hub_sets_offline(tok, hub_offline, name):
    with pytest.raises(QoqError) as err:
        load_calibration(name, tok, n_samples=2, seqlen=16)
    msg = str(err.value)
    assert "\n" not in msg and f"'{name}'" in msg and "unreachable" in msg and "spec='PATH'" in msg
    assert "spec='data-free'" in msg
    with pytest.raises(QoqError, match="unreachable"):  # what quantize checks before it loads the model
        check_calibration_path(name)


def test_data_free(tiny_model_dir):
    from qoq.models import load_model

    lm = load_model(str(tiny_model_dir("llama")))
    state = torch.get_rng_state()
    a = load_calibration("data-free", lm.tokenizer, n_samples=3, seqlen=12, model=lm.model)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    _check(a, 3, 12, lm.model.config.vocab_size)
    assert a.description.startswith("data-free")
    b = load_calibration("data-free", lm.tokenizer, n_samples=3, seqlen=12, model=lm.model)
    assert torch.equal(a.input_ids, b.input_ids)
    assert len(set(a.input_ids.flatten().tolist())) > 5  # sampled, not a constant


def test_auto_offline_local_file(tok, hub_offline, monkeypatch, text_file):
    monkeypatch.setenv("QOQ_CALIB_DATA", str(text_file))
    cs = load_calibration(None, tok, n_samples=4, seqlen=16)
    _check(cs, 4, 16, len(tok))
    assert cs.description.startswith("auto: hub unreachable → local text") and str(text_file) in cs.description
    assert cs.sha256 == load_calibration(str(text_file), tok, n_samples=4, seqlen=16).sha256


def test_auto_offline_data_dir(tok, hub_offline, monkeypatch, tmp_path):
    monkeypatch.delenv("QOQ_CALIB_DATA", raising=False)
    (tmp_path / "calibration" / "set").mkdir(parents=True)
    (tmp_path / "calibration" / "set" / "x.txt").write_text("\n\n".join(PARAGRAPHS))
    monkeypatch.setenv("QOQ_DATA_DIR", str(tmp_path))
    cs = load_calibration("auto", tok, n_samples=4, seqlen=16)
    assert cs.description.startswith("auto: hub unreachable → local text") and "calibration" in cs.description


def test_auto_offline_data_free(tiny_model_dir, hub_offline, monkeypatch):
    from qoq.models import load_model

    monkeypatch.delenv("QOQ_CALIB_DATA", raising=False)
    monkeypatch.delenv("QOQ_DATA_DIR", raising=False)
    lm = load_model(str(tiny_model_dir("mistral")))
    cs = load_calibration("auto", lm.tokenizer, n_samples=2, seqlen=10, model=lm.model)
    _check(cs, 2, 10, lm.model.config.vocab_size)
    assert cs.description.startswith("auto: hub unreachable") and "data-free" in cs.description


def test_auto_missing_env_path(tok, hub_offline, monkeypatch, tmp_path):
    monkeypatch.setenv("QOQ_CALIB_DATA", str(tmp_path / "nope"))
    with pytest.raises(QoqError, match="QOQ_CALIB_DATA"):
        load_calibration("auto", tok, n_samples=2, seqlen=16)
