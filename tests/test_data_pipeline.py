"""Build from each input format, inspect, and refuse bad input with errors that name the problem."""

from __future__ import annotations

import json
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.__main__ import main as cli
from data_pipeline.build import BuildConfig, TokenizerConfig, build
from data_pipeline.config import ConfigError, load_config
from data_pipeline.languages import family_of, language_table
from data_pipeline.loader import PackedDataset
from data_pipeline.shards import read_manifest
from data_pipeline.sources import SourceConfig
from data_pipeline.synthetic.math_problems import generate_problems, verify_solution

RECORDS = [{"text": f"document number {i} " * (i % 7 + 1), "lang": ["en", "fr", "ru"][i % 3]} for i in range(60)]


def small_build(tmp_path, paths, **kw) -> BuildConfig:
    return BuildConfig(
        output_dir=str(tmp_path / "out"),
        sources=[SourceConfig(paths=paths)],
        seq_len=16,
        total_tokens=2000,
        valid_docs_per_family=2,
        tokenizer=TokenizerConfig(vocab_size=300),
        **kw,
    )


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow"])
def test_build_reads_each_format(tmp_path, fmt):
    path = tmp_path / f"docs.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in RECORDS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    else:
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, pa.Table.from_pylist(RECORDS).schema) as w:
            w.write_table(pa.Table.from_pylist(RECORDS))
    manifest = build(small_build(tmp_path, [str(path)]))
    assert manifest["families"] == ["germanic", "romance", "slavic"]
    assert len(PackedDataset(tmp_path / "out", "train")) > 0


def test_default_corpus_covers_families_and_scripts(corpus_dir):
    table = language_table()
    families, scripts = set(), set()
    for path in corpus_dir.glob("*.jsonl"):
        doc = json.loads(path.read_text().splitlines()[0])
        families.add(family_of(doc["lang"], table))
        scripts.update(unicodedata.name(ch).split()[0] for ch in doc["text"] if ch.isalpha())
    assert {"code", "synthetic"} <= families and len(families - {"code", "synthetic"}) >= 6
    assert len(scripts) >= 5, scripts


def test_language_table_covers_required_families():
    families = set(language_table().values())
    for required in [
        "germanic",
        "romance",
        "slavic",
        "indo_aryan",
        "sino_tibetan",
        "japonic",
        "koreanic",
        "semitic",
        "turkic",
        "dravidian",
        "code",
        "synthetic",
    ]:
        assert required in families
    assert family_of("pt-BR", language_table()) == "romance"
    with pytest.raises(KeyError, match="xx"):
        family_of("xx", language_table())


def test_math_problems_verify():
    problems = generate_problems(50, seed=3)
    assert all(verify_solution(p.solution, p.answer) for p in problems)
    wrong = problems[0].solution.replace(f"Answer: {problems[0].answer}", f"Answer: {problems[0].answer + 1}")
    assert not verify_solution(wrong, problems[0].answer)
    assert generate_problems(5, seed=3) == problems[:5], "deterministic by seed"


def test_unknown_language_names_file_and_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hello", "lang": "klingon"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: record 0: language 'klingon'"):
        build(small_build(tmp_path, [str(path)]))
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_missing_text_field_and_bad_json(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"body": "x", "lang": "en"}) + "\n")
    with pytest.raises(ConfigError, match="has no field 'text'"):
        build(small_build(tmp_path, [str(path)]))
    path.write_text('{"text": "ok", "lang": "en"}\n{not json\n')
    with pytest.raises(ValueError, match=r"docs\.jsonl:2: not valid JSON"):
        build(small_build(tmp_path, [str(path)]))


def test_unknown_config_key_is_refused_with_suggestion(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("output_dir: x\nsources: [{paths: [a]}]\nseq_lenn: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'seq_lenn'; did you mean 'seq_len'"):
        load_config(BuildConfig, config)
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(BuildConfig, None, ["output_dir=x", "sources=[{paths: [a]}]", "seq_len=abc"])


def test_cli_build_and_inspect(tmp_path, capsys):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    config = tmp_path / "data.yaml"
    config.write_text(
        f"output_dir: {tmp_path / 'out'}\nsources: [{{paths: ['{tmp_path}/docs.jsonl']}}]\n"
        "seq_len: 16\ntotal_tokens: 1000\ntokenizer: {vocab_size: 300}\n"
    )
    assert cli(["build", str(config), "ratios={germanic: 2, romance: 1, slavic: 1}"]) == 0
    assert cli(["inspect", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "germanic" in out and "0.500" in out
    assert read_manifest(tmp_path / "out")["family_stats"]["germanic"]["ratio"] == 0.5
    assert cli(["build", str(config), "ratios={tamil: 1}"]) == 2
    assert "ratios.tamil" in capsys.readouterr().err


def test_ratios_from_a_file(tmp_path):
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    (tmp_path / "ratios.yaml").write_text("germanic: 0.6\nromance: 0.3\nslavic: 0.1\n")
    config = small_build(tmp_path, [str(tmp_path / "docs.jsonl")], ratios=f"from {tmp_path / 'ratios.yaml'}")
    manifest = build(config)
    assert manifest["family_stats"]["germanic"]["ratio"] == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="not found"):
        build(small_build(tmp_path, [str(tmp_path / "docs.jsonl")], ratios="from /no/such.yaml"))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compressed_jsonl_dedup_and_min_chars(compression, tmp_path):
    suffix = {"gzip": "gz", "zstd": "zst"}[compression]
    path = tmp_path / f"docs.jsonl.{suffix}"
    records = RECORDS + RECORDS[:10] + [{"text": "tiny", "lang": "en"}]  # 10 exact duplicates, 1 short doc
    with pa.output_stream(str(path), compression=compression) as out:
        out.write("\n".join(json.dumps(r) for r in records).encode())
    config = small_build(tmp_path, [str(path)])
    config.sources[0].min_chars = 10
    manifest = build(config)
    assert manifest["duplicates_removed"] == 10
    kept = sum(s["available_tokens"] > 0 for s in manifest["family_stats"].values())
    assert kept == 3


def test_temperature_sampling_flattens_the_mixture():
    from data_pipeline.mixing import normalize_ratios

    available = {"germanic": 900, "slavic": 100}
    natural = normalize_ratios({}, available)
    flat = normalize_ratios({}, available, temperature=2.0)
    assert natural["germanic"] == pytest.approx(0.9)
    assert flat["germanic"] == pytest.approx(30 / 40)  # 900^0.5 : 100^0.5 = 30 : 10
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        normalize_ratios({}, available, temperature=0)
