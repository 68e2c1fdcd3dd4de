"""The embedded data sets are reproducible: rebuilding them gives the committed files, byte for byte."""

from pathlib import Path

import pytest

from data_builders.wordnet_definitions import main
from prefalign.data import EMBEDDED_DATASETS

WORDNET = Path("/usr/share/wordnet")


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(),
                    reason="needs Debian's wordnet-base (.ci/run installs it; apt-get install wordnet-base)")
def test_rebuild_is_byte_identical_to_the_committed_files(tmp_path):
    main(["--output-dir", str(tmp_path)])
    committed = EMBEDDED_DATASETS["wordnet-definitions"]
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (committed / f"{split}.jsonl").read_bytes()


def test_phrase_pairs_rebuild_byte_identical_to_the_committed_files(tmp_path):
    from data_builders.phrases import main as build_phrases

    committed = EMBEDDED_DATASETS["wordnet-phrases"]
    for split in ("train", "test"):
        build_phrases(["--split", split, "--output", str(tmp_path / f"{split}.jsonl"), "--seed", "0",
                       "--drop-unaligned"])
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (committed / f"{split}.jsonl").read_bytes()
