"""Label sets, the ontology tree (against a naive re-implementation of the reference), metadata
location, safe file names, and the validate-and-write part of ``uss metadata fetch``."""

import json
import random
import unicodedata

import numpy as np
import pytest

import jobs.metadata
from uss_core.errors import LabelError, MetadataError
from uss_core.ontology import (
    MAX_FILENAME_BYTES,
    ROOT_MID,
    LabelSet,
    Ontology,
    load_label_set,
    load_ontology,
    metadata_dir,
    metadata_file,
    safe_filename,
)

# uss/config.py ROOT_CLASS_ID_DICT, in order.
REFERENCE_ROOT_IDS = ["/m/0dgw9r", "/m/0jbk", "/m/04rlf", "/m/059j3w", "/t/dd00041", "/t/dd00098", "/t/dd00123"]


# ---------------------------------------------------------------------------------------------
# The oracle: uss/parse_ontology.py's algorithm, naively (a full pre-order search per entry).


class RefNode:
    def __init__(self, data, level):
        self.class_id, self.data, self.children, self.level = data["id"], data, [], level


def ref_search_parent(node, class_id):
    if class_id in node.data["child_ids"]:
        return node
    for child in node.children:
        found = ref_search_parent(child, class_id)
        if found:
            return found
    return None


def ref_traverse(node):
    nodes = [node]
    for child in node.children:
        nodes.extend(ref_traverse(child))
    return nodes


def reference_tree(entries):
    root = RefNode({"id": "root", "name": "root", "child_ids": REFERENCE_ROOT_IDS}, level=0)
    for data in entries:
        father = ref_search_parent(root, data["id"])
        father.children.append(RefNode(data, father.level + 1))
    return root


def assert_same_tree(ontology: Ontology, entries, labels: LabelSet | None = None):
    reference = ref_traverse(reference_tree(entries))
    assert ontology.subtree_mids(ROOT_MID) == [n.class_id for n in reference]
    parents = {child.class_id: node.class_id for node in reference for child in node.children}
    for ref in reference:
        node = ontology.node(ref.class_id)
        assert node.level == ref.level
        assert node.name == ref.data["name"]
        assert node.children == tuple(c.class_id for c in ref.children)
        assert node.parent == parents.get(ref.class_id)
        assert ontology.subtree_mids(ref.class_id) == [n.class_id for n in ref_traverse(ref)]
        if labels is not None:  # uss/inference.py get_children_indexes
            expected = [labels.index_of_mid(n.class_id) for n in ref_traverse(ref) if labels.has_mid(n.class_id)]
            assert ontology.subtree_indexes(ref.class_id, labels) == expected
    max_level = max(n.level for n in reference)
    assert ontology.max_level == max_level
    for level in range(max_level + 1):
        assert [n.mid for n in ontology.nodes_at_level(level)] == [n.class_id for n in reference if n.level == level]


def test_real_ontology_matches_reference_algorithm(audioset_dir):
    entries = json.loads((audioset_dir / "ontology.json").read_text())
    ontology = load_ontology(audioset_dir)
    labels = load_label_set(audioset_dir)
    assert_same_tree(ontology, entries, labels)
    assert [n.name for n in ontology.nodes_at_level(1)] == [
        "Human sounds",
        "Animal",
        "Music",
        "Natural sounds",
        "Sounds of things",
        "Source-ambiguous sounds",
        "Channel, environment and background",
    ]
    assert len(ontology.subtree_mids(ROOT_MID)) == len(entries) + 1
    music = ontology.resolve_node("music")
    assert music.mid == "/m/04rlf" and music.level == 1 and music.parent == ROOT_MID
    assert labels.resolve("Music") in ontology.subtree_indexes(music.mid, labels)


def entry(mid, *children):
    return {"id": mid, "name": f"name {mid}", "child_ids": list(children)}


def test_first_parent_in_pre_order_wins_not_first_in_file():
    a, b = REFERENCE_ROOT_IDS[:2]
    # X is listed by P1 (earlier in the file, under B) and P2 (later, under A): A's subtree comes
    # first in pre-order, so X hangs under P2.
    entries = [entry(a, "P2"), entry(b, "P1"), entry("P1", "X"), entry("P2", "X"), entry("X")]
    ontology = Ontology.from_entries(entries, "test")
    assert ontology.node("X").parent == "P2" and ontology.node("X").level == 3
    assert ontology.node("P1").children == ()
    assert_same_tree(ontology, entries)


def test_random_ontologies_match_reference_algorithm():
    rng = random.Random(0)
    for _ in range(30):
        mids = [f"n{i}" for i in range(rng.randint(1, 60))]
        listed: dict[str, list[str]] = {m: [] for m in REFERENCE_ROOT_IDS + mids}
        order = list(REFERENCE_ROOT_IDS[: rng.randint(1, 7)])
        for mid in mids:
            # every node is listed by at least one node that comes before it in the file
            for parent in rng.sample(order, min(len(order), rng.randint(1, 3))):
                listed[parent].append(mid)
            order.append(mid)
        entries = [entry(m, *listed[m]) for m in order]
        assert_same_tree(Ontology.from_entries(entries, "test"), entries)


def test_malformed_ontologies_are_reported():
    a = REFERENCE_ROOT_IDS[0]
    cases = [
        ({"not": "a list"}, "expected a non-empty JSON list"),
        ([{"id": a, "name": "x"}], "entry 0 is not an ontology node"),
        ([entry(a), entry(a)], "appears twice"),
        ([entry(a), entry("/m/orphan")], r"/m/orphan \(name /m/orphan\) has no parent"),
    ]
    for entries, message in cases:
        with pytest.raises(MetadataError, match=message) as info:
            Ontology.from_entries(entries, "somewhere/ontology.json")
        assert "somewhere/ontology.json" in str(info.value) and "uss metadata fetch" in str(info.value)


def test_unknown_nodes():
    ontology = Ontology.from_entries([entry(REFERENCE_ROOT_IDS[0], "child"), entry("child")], "test")
    with pytest.raises(LabelError, match="no ontology node has mid 'nope'"):
        ontology.subtree_mids("nope")
    with pytest.raises(LabelError, match=r"unknown ontology node 'name chld'; did you mean: 'name child'"):
        ontology.resolve_node("name chld")


# ---------------------------------------------------------------------------------------------
# Metadata location


def test_metadata_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("USS_METADATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert metadata_dir() == tmp_path / "home" / ".cache" / "uss-at-scale" / "metadata"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert metadata_dir() == tmp_path / "xdg" / "uss-at-scale" / "metadata"
    monkeypatch.setenv("USS_METADATA_DIR", str(tmp_path / "env"))
    assert metadata_dir() == tmp_path / "env"
    assert metadata_dir(tmp_path / "flag") == tmp_path / "flag"


def test_missing_metadata_says_how_to_get_it(tmp_path):
    for load in (load_ontology, load_label_set):
        with pytest.raises(MetadataError, match=r"not found in .*; run `uss metadata fetch` or pass --metadata-dir"):
            load(tmp_path)
    (tmp_path / "ontology.json").write_text("{broken")
    with pytest.raises(MetadataError, match=r"ontology.json: cannot read the ontology .*uss metadata fetch"):
        load_ontology(tmp_path)
    assert metadata_file("ontology.json", tmp_path) == tmp_path / "ontology.json"


# ---------------------------------------------------------------------------------------------
# Label sets


def test_audioset_label_set(audioset_dir, tmp_path):
    labels = load_label_set(audioset_dir)
    assert len(labels) == 527
    assert labels.names[0] == "Speech" and labels.mids[0] == "/m/09x0r"
    assert labels.names[1] == "Male speech, man speaking"  # quoted, with a comma
    assert labels.resolve("Male speech, man speaking") == 1
    copy = labels.to_csv(tmp_path / "labels.csv")
    assert LabelSet.from_csv(copy) == labels
    assert LabelSet.from_records(json.loads(json.dumps(labels.to_records()))) == labels
    assert load_label_set(audioset_dir, labels_csv=copy) == labels


def test_resolution_rules():
    labels = LabelSet(mids=("/m/a", "/m/b", "/m/c", "x1", "x2"), names=("Piano", "piano", "Organ", "Bell", "bell "))
    assert labels.resolve("Piano") == 0 and labels.resolve("piano") == 1  # exact name first
    assert labels.resolve("/m/c") == 2 and labels.resolve("organ") == 2  # then mid, then any case
    with pytest.raises(LabelError, match=r"'PIANO' is ambiguous, it matches 'Piano' \(/m/a\), 'piano' \(/m/b\)"):
        labels.resolve("PIANO")
    with pytest.raises(LabelError, match=r"unknown label 'Orgn'; did you mean: 'Organ'\?"):
        labels.resolve("Orgn")
    with pytest.raises(LabelError, match=r"'2': labels are display names or mids, not numbers.*--class-id 2"):
        labels.resolve("2")
    with pytest.raises(LabelError, match="unknown label 'qqqqqqq'; give a display name or mid"):
        labels.resolve("qqqqqqq")
    assert labels.resolve_index(4) == 4 and labels.resolve_index(np.int64(3)) == 3
    for bad in (5, -1):
        with pytest.raises(LabelError, match=f"class index {bad} is out of range; .* classes 0-4"):
            labels.resolve_index(bad)
    for bad in (True, 1.5, "1"):
        with pytest.raises(LabelError, match="class index must be an integer"):
            labels.resolve_index(bad)
    assert labels.name_of(2) == "Organ" and labels.index_of_mid("x2") == 4
    with pytest.raises(LabelError, match="mid 'x3' is not in this label set"):
        labels.index_of_mid("x3")


def test_subsets_and_custom_csvs(tmp_path):
    labels = LabelSet(mids=tuple(f"id{i}" for i in range(4)), names=("Dog", 'Say "hi", twice', "Ünïcödé", "Cat"))
    sub = labels.subset([3, 1])
    assert sub.names == ("Cat", 'Say "hi", twice') and sub.mids == ("id3", "id1")
    assert LabelSet.from_csv(sub.to_csv(tmp_path / "sub.csv")) == sub
    own = tmp_path / "own.csv"
    own.write_text('\ufeffindex,mid,display_name\n0,my/dog,"Barking, loud"\n1,my/cat,Meow\n\n', encoding="utf-8")
    custom = LabelSet.from_csv(own)
    assert custom.names == ("Barking, loud", "Meow") and custom.resolve("meow") == 1
    with pytest.raises(LabelError, match="mids must be unique"):
        LabelSet(mids=("a", "a"), names=("x", "y"))
    with pytest.raises(LabelError, match="empty"):
        LabelSet(mids=(), names=())


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "first line must be 'index,mid,display_name'"),
        ("idx,mid,name\n0,a,b\n", "first line must be 'index,mid,display_name'"),
        ("index,mid,display_name\n0,a,b\n2,c,d\n", r"line 3: index '2', expected 1"),
        ("index,mid,display_name\n0,a\n", "line 2: expected 3 columns, got 2"),
        ("index,mid,display_name\n0,a,b\n1,a,c\n", "mid 'a' appears twice"),
        ("index,mid,display_name\n", "label set is empty"),
        ("index,mid,display_name\n0,a,\n", "class 0 needs a non-empty mid and name"),
    ],
)
def test_malformed_label_csvs_are_reported(tmp_path, text, message):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(MetadataError, match=message) as info:
        LabelSet.from_csv(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# Safe file names

NASTY = [
    "",
    " ",
    ".",
    "..",
    "...",
    " . . ",
    "/",
    "a/b\\c:d*e?f\"g<h>i|j",
    "CON",
    "con",
    "Con.wav",
    "NUL.tar.gz",
    "COM1",
    "lpt9 ",
    "COM\u00b9",
    "CONIN$",
    "\x00\x01\x1f\x7f",
    "tab\there\nnewline\r\n",
    "\u200b\u200e\ufeff",
    "\ud800lone surrogate\udfff",
    "e\u0301 combining",
    "\u2028line\u2029para",
    "-leading dash",
    "trailing dot.",
    ".hidden",
    "x" * 500,
    "\U0001f3b5" * 100,
    "a" * 118 + "\U0001f3b5" * 3,
    ". " * 200 + "end",
    "Violin, fiddle",
]


def random_labels(count: int, seed: int = 0):
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0, 0x250)] + list("/\\:*?\"<>|. \u200b\u2028\ud800\U0001f3b5\u00e9\u0301")
    for _ in range(count):
        yield "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))


def assert_safe(name: str):
    assert name and isinstance(name, str)
    assert len(name.encode("utf-8")) <= MAX_FILENAME_BYTES
    assert not set(name) & set('/\\:*?"<>|')
    assert all(unicodedata.category(ch) not in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in name)
    assert name == name.strip(" .")
    assert "  " not in name
    stem = name.split(".")[0].rstrip(" ").upper()
    assert stem not in {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    assert not (stem[:3] in ("COM", "LPT") and len(stem) == 4 and stem[3] in "0123456789\u00b9\u00b2\u00b3")
    assert safe_filename(name) == name  # idempotent


def test_safe_filename_is_safe_for_nasty_and_random_labels(tmp_path):
    names = set()
    labels = NASTY + list(random_labels(400))
    for label in labels:
        name = safe_filename(label)
        assert_safe(name)
        names.add(name)
        (tmp_path / (name + ".wav")).write_bytes(b"")  # a real file system accepts it
    assert len({label for label in labels}) - len(names) < 10  # distinct labels rarely collide


def test_safe_filename_stays_readable():
    assert safe_filename("Violin, fiddle") == "Violin, fiddle"
    assert safe_filename("Male speech, man speaking") == "Male speech, man speaking"
    assert safe_filename("Rock/pop: loud?") == "Rock_pop_ loud_"
    assert safe_filename("  Speech  \t synthesizer. ") == "Speech synthesizer"
    assert safe_filename("CON") == "CON_" and safe_filename("con.wav") == "con_.wav"
    long_a, long_b = safe_filename("y" * 300), safe_filename("y" * 301)
    assert long_a != long_b and long_a.startswith("y" * 100)
    assert safe_filename("") != safe_filename("...") and safe_filename("").startswith("unnamed-")


def test_audioset_names_are_kept_as_they_are(audioset_dir):
    labels = load_label_set(audioset_dir)
    # Only a trailing dot (e.g. "Bee, wasp, etc.") has to go: Windows drops it silently.
    assert [safe_filename(n) for n in labels.names] == [n.rstrip(".") for n in labels.names]


# ---------------------------------------------------------------------------------------------
# uss metadata fetch, without the network


def test_fetch_validates_and_writes(audioset_dir, tmp_path, monkeypatch, capsys):
    ontology_bytes = (audioset_dir / "ontology.json").read_bytes()
    labels_bytes = (audioset_dir / "class_labels_indices.csv").read_bytes()
    target = tmp_path / "meta"
    written = jobs.metadata.validate_and_write(target, ontology_bytes, labels_bytes)
    assert written == [target / "ontology.json", target / "class_labels_indices.csv"]
    assert (target / "ontology.json").read_bytes() == ontology_bytes
    assert len(load_label_set(target)) == 527 and load_ontology(target).max_level >= 3

    downloads = {jobs.metadata.ONTOLOGY_URL: ontology_bytes, jobs.metadata.LABELS_URL: labels_bytes}
    monkeypatch.setattr(jobs.metadata, "download", downloads.__getitem__)
    assert jobs.metadata.main(["fetch", "--metadata-dir", str(tmp_path / "via-main")]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "via-main" / "ontology.json") in out and "CC BY-SA 4.0" in out


def test_fetch_rejects_bad_downloads_and_writes_nothing(audioset_dir, tmp_path):
    ontology_bytes = (audioset_dir / "ontology.json").read_bytes()
    labels_bytes = (audioset_dir / "class_labels_indices.csv").read_bytes()
    target = tmp_path / "meta"
    bad_cases = [
        (b"<html>rate limited</html>", labels_bytes, "not UTF-8 JSON and CSV"),
        (b'{"id": 1}', labels_bytes, "expected a non-empty JSON list"),
        (ontology_bytes, b"<html>oops</html>", "first line must be 'index,mid,display_name'"),
        (ontology_bytes, b"index,mid,display_name\n0,/m/unknown,Nope\n", "1 labels are not in ontology.json"),
    ]
    for ontology_data, labels_data, message in bad_cases:
        with pytest.raises(MetadataError, match=message):
            jobs.metadata.validate_and_write(target, ontology_data, labels_data)
        assert not target.exists()
