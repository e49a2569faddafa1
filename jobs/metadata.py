"""``uss metadata fetch``: download the AudioSet ontology and label list into the metadata folder.

The files are checked (they must parse as the AudioSet ontology and label list, and agree with
each other) before anything is written, and each is written atomically, so the folder never holds
a partial or broken copy.
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from pathlib import Path

from uss_core.errors import MetadataError
from uss_core.files import atomic_path
from uss_core.ontology import LABELS_FILENAME, ONTOLOGY_FILENAME, ROOT_MID, LabelSet, Ontology, metadata_dir

ONTOLOGY_URL = "https://raw.githubusercontent.com/audioset/ontology/master/ontology.json"
LABELS_URL = "https://storage.googleapis.com/us_audioset/youtube_corpus/v1/csv/class_labels_indices.csv"
LICENSE_NOTE = (
    "AudioSet ontology and label list: Google, licensed CC BY-SA 4.0 "
    "(https://creativecommons.org/licenses/by-sa/4.0/)"
)
DOWNLOAD_TIMEOUT_SECONDS = 60


def download(url: str) -> bytes:
    """The body of ``url``; MetadataError (saying what to do) if it cannot be fetched."""
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise MetadataError(
            f"cannot download {url} ({exc}); check the network, or download it by hand into the folder "
            "given by --metadata-dir / USS_METADATA_DIR"
        ) from None


def validate_and_write(
    directory: str | Path, ontology_json: bytes, labels_csv: bytes, *, source: str = "downloaded"
) -> list[Path]:
    """Check the two files' contents, then write them atomically into ``directory``.

    Raises MetadataError (and writes nothing) unless ``ontology_json`` is a JSON list of
    ontology nodes, ``labels_csv`` is a ``index,mid,display_name`` label list, and every label
    is an ontology node. Returns the written paths.
    """
    try:
        entries = json.loads(ontology_json.decode("utf-8"))
        labels_text = labels_csv.decode("utf-8-sig")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"the {source} metadata is not UTF-8 JSON and CSV ({exc}); try again later") from None
    ontology = Ontology.from_entries(entries, f"{source} {ONTOLOGY_FILENAME}")
    labels = LabelSet.parse_csv(labels_text, f"{source} {LABELS_FILENAME}")
    ontology_mids = set(ontology.subtree_mids(ROOT_MID))
    strays = [mid for mid in labels.mids if mid not in ontology_mids]
    if strays:
        raise MetadataError(
            f"{source} {LABELS_FILENAME}: {len(strays)} labels are not in {ONTOLOGY_FILENAME} (e.g. {strays[0]}); "
            "the two files do not belong together, try again later"
        )
    directory = Path(directory)
    written = []
    for name, data in ((ONTOLOGY_FILENAME, ontology_json), (LABELS_FILENAME, labels_csv)):
        with atomic_path(directory / name) as temp:
            temp.write_bytes(data)
        written.append(directory / name)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uss metadata", description="Manage the AudioSet metadata files.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fetch = commands.add_parser(
        "fetch", help="download ontology.json and class_labels_indices.csv", description=LICENSE_NOTE
    )
    fetch.add_argument(
        "--metadata-dir", help="where to put them (default: $USS_METADATA_DIR, else ~/.cache/uss-at-scale/metadata)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    directory = metadata_dir(args.metadata_dir)
    paths = validate_and_write(directory, download(ONTOLOGY_URL), download(LABELS_URL))
    for path in paths:
        print(f"wrote {path}")
    print(LICENSE_NOTE)
    return 0
