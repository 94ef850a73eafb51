"""Build from each input format, inspect, and refuse bad input with errors that name the problem."""

from __future__ import annotations

import dataclasses
import functools
import json
import unicodedata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError, load_config
from common.locks import LockedError
from data_pipeline.__main__ import main as cli
from data_pipeline.build import BuildConfig, NearDedupConfig, TokenizerConfig, build
from data_pipeline.languages import family_of, language_table
from data_pipeline.loader import PackedDataset
from data_pipeline.mixed import MixConfig, MixedDataset
from data_pipeline.shards import read_manifest
from data_pipeline.sources import SourceConfig
from data_pipeline.synthetic.math_problems import generate_problems, verify_solution

RECORDS = [{"text": f"document number {i} " * (i % 7 + 1), "lang": ["en", "fr", "ru"][i % 3]} for i in range(60)]


def small_build(tmp_path, paths=None, sources=None, **kw) -> BuildConfig:
    return BuildConfig(
        output_dir=str(tmp_path / "out"),
        sources=sources or [SourceConfig(paths=paths)],
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
    assert len(MixedDataset(tmp_path / "out", MixConfig())) > 0


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
    # Model outputs may contain any step; a zero is only a problem when it divides.
    assert verify_solution("Step 1: 5 + 0 = 5\nAnswer: 5", 5)
    assert not verify_solution("Step 1: 5 / 0 = 5\nAnswer: 5", 5)


def test_unknown_language_names_file_and_record(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hello", "lang": "klingon"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad\.jsonl: record 1: language 'klingon'"):
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


def good_records(path: Path, n: int = 40) -> Path:
    path.write_text("".join(json.dumps({"text": f"good text {i} " * 5, "lang": "en"}) + "\n" for i in range(n)))
    return path


FINE = b'{"text": "fine", "lang": "en"}\n'


@pytest.mark.parametrize(
    "content, message",
    [
        (FINE + b'{"text": "caf\xff", "lang": "fr"}\n', r"bad\.jsonl:2: not valid UTF-8 \(byte 0xff"),
        (FINE + b'{"text": 12345, "lang": "en"}\n', r"bad\.jsonl: record 2: field 'text' is int"),
        (b'{"text": "fine", "lang": null}\n', r"bad\.jsonl: record 1 has no language"),
        (FINE + b'{"text": null, "lang": "en"}\n', r"bad\.jsonl: record 2: field 'text' is null, not text"),
        (FINE + b'{"text": "fine", "lang": 7}\n', r"bad\.jsonl: record 2: field 'lang' is int 7, not a language code"),
        (FINE + b'{"text": "fine", "lang": "dee"}\n', r"record 2: language 'dee' has no .*did you mean 'de'"),
        (b"", r"bad\.jsonl: no records"),
        (b"\n\n", r"bad\.jsonl: no records"),
    ],
    ids=["invalid-utf8", "number-as-text", "no-language", "null-text", "number-as-language", "misspelt-language",
         "empty", "blank-lines"],
)  # fmt: skip
def test_bad_input_names_file_and_line_and_keeps_the_previous_output(tmp_path, content, message):
    good = good_records(tmp_path / "good.jsonl")
    first = build(small_build(tmp_path, [str(good)]))
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        build(small_build(tmp_path, [str(good), str(tmp_path / "bad.jsonl")]))
    assert read_manifest(tmp_path / "out") == first, "the previous dataset is untouched"
    assert not (tmp_path / "out.building").exists(), "no staging folder is left behind"


def test_one_build_per_output_folder_and_no_stale_lock_after_a_kill(tmp_path):
    """A process holding the build's lock (as a running build does) makes a second build into the same
    folder stop before it touches anything, naming the holder; killed with SIGKILL, it blocks nothing."""
    import subprocess
    import sys

    config = small_build(tmp_path, [str(good_records(tmp_path / "good.jsonl"))])
    out = Path(config.output_dir).absolute()
    staging = out.with_name(out.name + ".building")
    staging.mkdir()
    (staging / "the first build's file").write_text("")
    hold = "import sys, time; from pathlib import Path; from data_pipeline.build import lock_build; " \
           "lock_build(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE,
                              cwd=Path(__file__).parents[1])  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == b"locked"
        yaml_config = tmp_path / "build.yaml"
        yaml_config.write_text(
            json.dumps({"output_dir": str(out), "sources": [{"paths": [str(tmp_path / "good.jsonl")]}]})
        )
        assert cli(["build", str(yaml_config)]) == 4
        with pytest.raises(LockedError, match=rf'{out} is being built by another process \(.*"pid": {holder.pid}'):
            build(config)
        assert (staging / "the first build's file").is_file(), "the holder's staging folder is untouched"
    finally:
        holder.kill()
        holder.wait()
    assert build(config)["store"]["splits"]["train"], "a killed holder leaves no stale lock"


@pytest.mark.parametrize("near_dedup", [False, True], ids=["exact-dedup", "near-dedup"])
def test_a_file_the_filters_empty_is_named_in_the_warnings(tmp_path, near_dedup):
    """Blank records (or ones the length filters drop) leave a file with no document: the build goes
    on with the others and says which file gave nothing, with or without near-dedup."""
    good = good_records(tmp_path / "good.jsonl")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("".join(json.dumps({"text": "  ", "lang": "en"}) + "\n" for _ in range(3)))
    near = NearDedupConfig() if near_dedup else None
    manifest = build(small_build(tmp_path, [str(good), str(blank)], near_dedup=near))
    assert [w for w in manifest["warnings"] if "blank.jsonl" in w] == [
        f"{blank}: no document left after the length filters (min_chars, max_chars) or blank records; "
        "nothing of it is in the dataset"
    ]
    assert manifest["family_stats"]["germanic"]["tokens"] > 0


def test_config_mistakes_are_found_before_any_document_is_read(tmp_path, monkeypatch):
    from data_pipeline import build as build_module

    good = good_records(tmp_path / "good.jsonl")
    monkeypatch.setattr(build_module, "train_tokenizer", lambda *a: pytest.fail("tokenizer trained before the check"))
    with pytest.raises(ConfigError, match="ratios.romanse: no such language family; did you mean 'romance'"):
        build(dataclasses.replace(small_build(tmp_path, [str(good)]), ratios={"romanse": 1.0}))
    with pytest.raises(ConfigError, match=r"sources\[0\]\.lang: language 'eng' has no family.*did you mean 'en'"):
        build(small_build(tmp_path, sources=[SourceConfig(paths=[str(good)], lang="eng")]))
    assert not (tmp_path / "out.building").exists()


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


def test_ratios_say_what_they_did(tmp_path):
    """Weights that do not sum to 1 are normalised, families left out get nothing, and a family capped
    at max_epochs leaves the total short by what it could not supply: each said in the manifest."""
    paths = write_jsonl_files(tmp_path)  # English, French and Russian documents
    partial = build(small_build(tmp_path / "partial", paths, ratios={"germanic": 0.2}))
    assert partial["warnings"][:2] == [
        "ratios sum to 0.2, not 1: normalised over the families listed to germanic 100.00%",
        "families in the data but not in ratios get no tokens: romance, slavic",
    ]
    assert set(partial["family_stats"]) == {"germanic"}
    ratios = {"germanic": 0.9, "slavic": 0.1}  # about 240 tokens each: germanic cannot supply 1,800 in one epoch
    capped = build(small_build(tmp_path / "capped", paths, ratios=ratios, max_epochs=1.0))
    drawn = sum(f["tokens"] for f in capped["family_stats"].values())
    assert drawn < 2000 and capped["family_stats"]["slavic"]["tokens"] == 200, "the other family keeps its budget"
    shortfall = [w for w in capped["warnings"] if "training tokens instead of" in w]
    assert shortfall == [
        f"{drawn:,} training tokens instead of the 2,000 asked: the capped families (germanic) could not supply "
        f"{2000 - drawn:,}, which go to no other family (each keeps its own budget, so its share of the smaller "
        "total is above its ratio); raise max_epochs or lower total_tokens"
    ]


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


def shard_hashes(out) -> dict[str, str]:
    """Every data file of a build (store parts, and packed shards if written) by its checksum."""
    manifest = read_manifest(out)
    splits = [*manifest["splits"].values(), *manifest["store"]["splits"].values()]
    return {e["file"]: e["sha256"] for split in splits for e in split}


def write_jsonl_files(tmp_path, count=4) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in RECORDS[i::count]))
        paths.append(str(path))
    return paths


def test_parallel_build_equals_single_process_build(tmp_path):
    paths = write_jsonl_files(tmp_path)
    one = build(dataclasses.replace(small_build(tmp_path / "a", paths), workers=1))
    two = build(dataclasses.replace(small_build(tmp_path / "b", paths), workers=2))
    assert one["tokenizer_hash"] == two["tokenizer_hash"]
    assert shard_hashes(tmp_path / "a" / "out") == shard_hashes(tmp_path / "b" / "out")


def test_interrupted_build_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    from data_pipeline import build_pack

    paths = write_jsonl_files(tmp_path)
    reference = build(small_build(tmp_path / "ref", paths, workers=1, sequences_per_shard=8, shards=True))
    config = small_build(tmp_path / "run", paths, workers=1, sequences_per_shard=8, shards=True)
    out = Path(config.output_dir)
    out.mkdir(parents=True)
    (out / "keep.txt").write_text("the previous dataset")  # must survive a failed build
    # Interrupt once while tokenizing (the third file is unreadable) ...
    good = Path(paths[2]).read_text()
    Path(paths[2]).write_text("{not json\n")
    with pytest.raises(ValueError, match="part2.jsonl:1: not valid JSON"):
        build(config)
    assert (out / "keep.txt").is_file()
    Path(paths[2]).write_text(good)
    # ... and once after two training shards are written.
    original, written = build_pack.write_shard, []

    def recording_write(out_dir, split, name, packed, fail_after=None):
        if split == "train":
            if len(written) == fail_after:
                raise KeyboardInterrupt
            written.append(name)
        return original(out_dir, split, name, packed)

    monkeypatch.setattr(build_pack, "write_shard", functools.partial(recording_write, fail_after=2))
    with pytest.raises(KeyboardInterrupt):
        build(config)
    assert (out / "keep.txt").is_file()
    monkeypatch.setattr(build_pack, "write_shard", recording_write)
    capsys.readouterr()
    resumed = build(config)
    assert "4 of 4 source files already tokenized" in capsys.readouterr().out
    train_shards = len(reference["splits"]["train"])
    assert written[2:] == [f"shard_{i:05d}" for i in range(2, train_shards)], "finished shards are not rewritten"
    assert shard_hashes(out) == shard_hashes(tmp_path / "ref" / "out")
    assert resumed["family_stats"] == reference["family_stats"]
    assert not out.with_name("out.building").exists() and not (out / "keep.txt").exists()


def test_hugging_face_datasets_sources(tmp_path):
    import datasets

    paths = write_jsonl_files(tmp_path, count=1)
    datasets.Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    saved = build(small_build(tmp_path / "a", sources=[SourceConfig(hf_dataset=str(tmp_path / "saved"))]))
    loaded_source = SourceConfig(hf_dataset="json", hf_data_files=paths)
    loaded = build(small_build(tmp_path / "b", sources=[loaded_source]))
    plain = build(small_build(tmp_path / "c", paths))
    for manifest in (saved, loaded):
        assert manifest["family_stats"] == plain["family_stats"]
    with pytest.raises(ConfigError, match="hf_dataset 'no-such-builder-here'"):
        build(small_build(tmp_path / "d", sources=[SourceConfig(hf_dataset="no-such-builder-here")]))


def test_language_identification_when_records_have_no_language(tmp_path):
    texts = {
        "en": "The weather today is nice and we are going to walk in the park with the children.",
        "de": "Das Wetter ist heute schön und wir gehen mit den Kindern im Park spazieren.",
        "fr": "Il fait beau aujourd'hui et nous allons nous promener dans le parc avec les enfants.",
        "ru": "Сегодня хорошая погода, и мы пойдём гулять в парк с детьми.",
        "ja": "今日は天気が良いので、子供たちと公園を散歩します。",
    }
    path = tmp_path / "unlabelled.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"{t} {i}"}) for i in range(12) for t in texts.values()))
    config = small_build(tmp_path, [str(path)])
    config.sources[0].lang, config.sources[0].lang_field = "auto", None
    manifest = build(config)
    assert manifest["families"] == ["germanic", "japonic", "romance", "slavic"]
    assert (
        manifest["family_stats"]["germanic"]["available_tokens"]
        > manifest["family_stats"]["slavic"]["available_tokens"]
    )


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_dedup_shuffle_drops_what_the_sequential_rule_drops(tmp_path, partitions):
    """Exact and near duplicates found by hash and band shuffles equal the walk in document order
    with a set of hashes, datasketch's MinHashLSH on the same bands and the exact Jaccard check, on
    texts of six words so that buckets collide in chains (a document near one that was itself
    dropped is kept) and many candidates fail the check."""
    from datasketch import LeanMinHash, MinHashLSH

    from data_pipeline import dedup
    from data_pipeline.build import NearDedupConfig
    from data_pipeline.build_tokenize import MINHASH_SCHEME, _minhash
    from data_pipeline.tokenizer import encode_batch, text_only, train_bpe

    rng = np.random.default_rng(partitions)
    near = NearDedupConfig(threshold=0.5, num_perm=32, ngram=2)
    units, rows, words = 4, 60, ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    texts = [[" ".join(rng.choice(words, size=8)) for _ in range(rows)] for _ in range(units)]
    tokenizer = train_bpe([t for unit in texts for t in unit], 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    bands = dedup.lsh_bands(near.threshold, near.num_perm)
    lsh = MinHashLSH(threshold=0.5, num_perm=near.num_perm, params=(len(bands), bands[0][1] - bands[0][0]))
    seen, kept, want_exact, want_near = set(), {}, [], []
    for u in range(units):
        signatures = np.stack([_minhash(t, near) for t in texts[u]])
        ids, lengths, _ = encode_batch(text_only(tokenizer), None, texts[u])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        table = pa.table({"key": pa.array([t.encode().ljust(64)[:16] for t in texts[u]], pa.binary(16)),
                          "minhash": pa.array(list(signatures), pa.list_(pa.uint64(), near.num_perm)),
                          "tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))})  # fmt: skip
        with pa.OSFile(str(tmp_path / f"u{u}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        for row, text in enumerate(texts[u]):
            code = (u << 32) | row
            if text.encode().ljust(64)[:16] in seen:  # the key: the text's first 16 bytes, so some repeat
                want_exact.append(code)
                continue
            seen.add(text.encode().ljust(64)[:16])
            grams = dedup.shingles(text, near.ngram)
            signature = LeanMinHash(seed=1, hashvalues=signatures[row], scheme=MINHASH_SCHEME)
            if any(dedup.jaccard(grams, kept[c]) >= near.threshold for c in lsh.query(signature)):
                want_near.append(code)
                continue
            lsh.insert(code, signature)
            kept[code] = grams
    for u in range(units):
        dedup.partition_unit(u, str(tmp_path / f"u{u}.arrow"), str(tmp_path), partitions, True, bands)
    for p in range(partitions):
        dedup.resolve_partition(p, units, str(tmp_path))
    unit_files = [str(tmp_path / f"u{u}.arrow") for u in range(units)]
    dedup.resolve_near(partitions, str(tmp_path), unit_files, str(tmp_path / "tokenizer.json"), 2, 0.5)
    dropped = np.load(tmp_path / "dropped.npz")
    assert dropped["exact"].tolist() == want_exact and dropped["near"].tolist() == sorted(want_near)
    assert 0 < len(want_near) < units * rows - len(want_exact) - 1, "the case must keep some and drop some"


def test_minhash_removes_near_duplicates_that_exact_dedup_keeps(tmp_path):
    from data_pipeline.build import NearDedupConfig

    rng = np.random.default_rng(0)
    base = [" ".join(f"word{w}" for w in rng.integers(0, 500, size=60)) for _ in range(20)]
    near_copies = [text.replace("word", "w0rd", 1) for text in base[:8]]  # one token differs
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "lang": "en"}) for t in base + near_copies))
    exact_only = build(small_build(tmp_path / "a", [str(path)]))
    assert exact_only["duplicates_removed"] == 0 and exact_only["near_duplicates_removed"] == 0
    near = build(
        dataclasses.replace(small_build(tmp_path / "b", [str(path)]), near_dedup=NearDedupConfig(threshold=0.8))
    )
    assert near["near_duplicates_removed"] == 8


def test_validation_shards_per_family_and_best_fit_report(tmp_path):
    paths = write_jsonl_files(tmp_path)
    manifest = build(dataclasses.replace(small_build(tmp_path, paths, packing="best_fit", shards=True), seq_len=64))
    valid = manifest["splits"]["valid"]
    assert sorted(e["family"] for e in valid) == manifest["families"]
    dataset = PackedDataset(tmp_path / "out", "valid")
    families = dataset.get(np.arange(len(dataset))).family_ids
    start = 0
    for entry in valid:  # each family's shard holds only that family
        rows = families[start : start + entry["sequences"]]
        assert set(rows.unique().tolist()) - {-1} == {manifest["families"].index(entry["family"])}
        start += entry["sequences"]
    packing = manifest["packing"]
    assert packing["strategy"] == "best_fit" and 0 < packing["padding_fraction"] < 0.5
    train = PackedDataset(tmp_path / "out", "train")
    batch = train.get(np.arange(len(train)))
    eos = manifest["eos_id"]
    for tokens, ids in zip(batch.tokens, batch.doc_ids, strict=True):  # whole documents: each ends in EOS
        for d in range(int(ids.max()) + 1):
            assert tokens[ids == d][-1] == eos


def test_fast_encoder_gives_the_tokenizers_ids_or_is_not_used(corpus_dir, small_dataset):
    from tokenizers import normalizers

    from data_pipeline.tokenizer import encode_batch, fast_encoder, load_tokenizer

    tokenizer = load_tokenizer(small_dataset)
    texts = [json.loads(line)["text"] for p in sorted(corpus_dir.glob("*.jsonl")) for line in p.open()][::7]
    texts += ["  spaces\tand\ttabs\n\n", "émojis 🙂 and ünïcödé", "it's we're 12345 x=1;"]
    fast = fast_encoder(tokenizer)
    assert fast is not None
    want = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    assert [fast.encode_ordinary(t) for t in texts] == want
    tokenizer.normalizer = normalizers.Lowercase()  # something tiktoken cannot reproduce
    assert fast_encoder(tokenizer) is None
    ids, lengths, agreed = encode_batch(tokenizer, fast, ["Upper Case"])  # a stale fast encoder is caught
    assert not agreed and ids.tolist() == tokenizer.encode("Upper Case", add_special_tokens=False).ids
    assert lengths.tolist() == [len(ids)]


def test_word_cache_gives_the_encoders_ids_on_any_whitespace(corpus_dir):
    """The word cache takes a text's words one by one only where its pieces cannot cross a word
    boundary: random texts over every kind of whitespace (runs, tabs, blank lines, every White_Space
    character, and characters that look like space but are not), contractions, digits, marks and emoji, and the
    corpus's prose with newlines, give tiktoken's ids on the whole text, one by one and in batches
    that mix cached words, words past a full cache (3 words) and texts encoded whole. The BPE is
    trained on those texts, so it has merges across whitespace for a wrong split to show."""
    from data_pipeline.tokenizer import WordCachedEncoder, fast_encoder, train_bpe

    pieces = [*"ab Zé", "\u044f\u0437", "\u4e2d\u6587", "\u0639\u0631", "42", "'s", "'t", "'", ".", ",", "\u0301",
              "\u0915\u093f", "\u093e", "\u0bcd",  # Devanagari and Tamil vowel signs: marks inside words
              "\U0001f642", " ", " ", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\x1c", "\u2028",
              "\u200b", "\u00ad", "\x0b", "\x0c", "\x85", "\u1680", "\u2000", "\u200a", "\u2029", "\u202f", "\u205f",
              "\u180e", "\ufeff"]  # fmt: skip
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(pieces, size=int(rng.integers(1, 40)))) for _ in range(3000)]
    prose = [json.loads(line)["text"] for p in sorted(corpus_dir.glob("*.jsonl")) for line in p.open()][::5]
    texts += prose + ["\n".join(prose[i : i + 3]) for i in range(0, len(prose), 3)]
    cached = fast_encoder(train_bpe(texts, 1000))
    tiny = WordCachedEncoder(cached.encode, capacity=3)
    for text in texts[::3]:
        want = cached.encode(text)
        assert cached.encode_ordinary(text) == want, repr(text)
        assert tiny.encode_ordinary(text) == want, repr(text)
    order = rng.permutation(len(texts))
    for start in range(0, len(texts), 97):
        batch = [texts[i] for i in order[start : start + 97]]
        want = [cached.encode(text) for text in batch]
        for encoder in (cached, tiny):
            ids, lengths = encoder.encode_texts(batch)
            assert lengths.tolist() == [len(w) for w in want] and ids.tolist() == sum(want, []), batch
    for encoder in (cached, tiny):  # empty texts, first and last
        ids, lengths = encoder.encode_texts(["", "ab Zé", ""])
        assert lengths.tolist() == [0, len(ids), 0] and ids.tolist() == cached.encode("ab Zé")
    assert len(cached._cache) > 100 and len(tiny._cache) == 3  # the words went through the cache


def test_document_text_never_becomes_a_control_token(small_dataset):
    """A literal `<|endoftext|>` or `<|pad|>` in a document is text: the same ids from tiktoken and from
    `tokenizers`, in either batch order, and never the EOS or PAD id."""
    from data_pipeline.tokenizer import encode_batch, fast_encoder, load_tokenizer, special_ids, text_only

    tokenizer = load_tokenizer(small_dataset)
    eos, pad = special_ids(tokenizer)
    texts = ["before <|endoftext|> after", "<|pad|><|pad|>x", "plain words", "<|endoftext|>"]
    documents, fast = text_only(tokenizer), fast_encoder(tokenizer)
    results = []
    for order in (texts, texts[::-1]):
        ids, lengths, agreed = encode_batch(documents, fast, order)
        by_tiktoken = [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]
        ids, lengths, _ = encode_batch(documents, None, order)
        assert agreed and by_tiktoken == [part.tolist() for part in np.split(ids, np.cumsum(lengths)[:-1])]
        results.append(dict(zip(order, by_tiktoken, strict=True)))
        assert not {eos, pad} & {i for ids in by_tiktoken for i in ids}
    assert results[0] == results[1]
    assert tokenizer.encode("<|endoftext|>", add_special_tokens=False).ids == [eos], "the control token itself stays"


def test_a_built_dataset_holds_one_eos_per_document_whatever_its_text(tmp_path):
    text = "story {} <|endoftext|> goes on <|pad|> and on <|endoftext|>"
    records = [{"text": text.format(i), "lang": "en"} for i in range(30)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = build(dataclasses.replace(small_build(tmp_path, [str(path)]), total_tokens=0, valid_docs_per_family=1))
    eos_count = 0
    for split in ("train", "valid"):
        data = MixedDataset(tmp_path / "out", MixConfig(), split)
        batch = data.get(np.arange(len(data)))
        eos_count += int(((batch.tokens == manifest["eos_id"]) & (batch.doc_ids >= 0)).sum())
    assert eos_count == len(records)


def test_minhash_signatures_are_datasketchs(corpus_dir):
    """The build's MinHash (permutations made once, letters counted only in text with unspaced
    scripts) gives datasketch's own signatures, on spaced, unspaced and mark-only text."""
    from datasketch import MinHash

    from data_pipeline.build import NearDedupConfig
    from data_pipeline.build_tokenize import MINHASH_SCHEME, _minhash
    from data_pipeline.dedup import shingles

    texts = [json.loads(line)["text"] for p in sorted(corpus_dir.glob("*.jsonl")) for line in p.open()][::40]
    texts += ["\u0e31\u0e34\u0e35" * 4, "中文没有空格的句子在这里" * 3, "mixed 中文 and words " * 4]
    near = NearDedupConfig(num_perm=32, ngram=3)
    for text in texts:
        want = MinHash(num_perm=32, seed=1, scheme=MINHASH_SCHEME)
        want.update_batch([g.encode() for g in shingles(text, 3)])
        np.testing.assert_array_equal(_minhash(text, near), want.hashvalues.astype(np.uint64))
    assert shingles("\u0e31\u0e34\u0e35", 2) == {"\u0e31\u0e34\u0e35"}  # marks, no letters: one word
    assert shingles("中文没有空格", 2) == {"中文", "文没", "没有", "有空", "空格"}


@pytest.mark.parametrize("script", ["zh", "ja"])
def test_near_duplicates_without_spaces_are_found(tmp_path, script):
    """Chinese and Japanese are written without spaces: shingles of characters, not of words."""
    from data_pipeline.build import NearDedupConfig

    rng = np.random.default_rng(1)
    alphabet = [chr(c) for c in (range(0x4E00, 0x4E00 + 2000) if script == "zh" else range(0x3041, 0x3097))]
    if script == "ja":
        alphabet += [chr(c) for c in range(0x4E00, 0x4E00 + 500)]
    base = ["".join(rng.choice(alphabet, size=300)) + "。" for _ in range(20)]
    near_copies = []
    for text in base[:10]:  # two characters replaced, and a line added at the end
        chars = list(text)
        for position in rng.choice(len(chars) - 1, size=2, replace=False):
            chars[position] = alphabet[(alphabet.index(chars[position]) + 1) % len(alphabet)]
        near_copies.append("".join(chars) + "\n以上")
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "lang": script}) + "\n" for t in base + near_copies))
    config = dataclasses.replace(small_build(tmp_path, [str(path)]), near_dedup=NearDedupConfig(threshold=0.8))
    assert build(config)["near_duplicates_removed"] >= 9  # recall >= 0.9


def test_shards_are_identical_whichever_encoder_runs(tmp_path, monkeypatch):
    """tiktoken when it reproduces the tokenizer, `tokenizers` otherwise: the same shards, control-token
    literals in the text included."""
    from data_pipeline import build_tokenize

    plain, literal = "line {} of plain words to tokenize", "line {} with <|endoftext|> and <|pad|> inside"
    texts = [(literal if i % 2 else plain).format(i) for i in range(40)]  # a batch starts with plain text
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t, "lang": "en"}) + "\n" for t in texts))
    build(dataclasses.replace(small_build(tmp_path / "fast", [str(path)]), workers=1))
    monkeypatch.setattr(build_tokenize, "fast_encoder", lambda tokenizer: None)  # the `tokenizers` path only
    build(dataclasses.replace(small_build(tmp_path / "slow", [str(path)]), workers=1))
    assert shard_hashes(tmp_path / "fast" / "out") == shard_hashes(tmp_path / "slow" / "out")
