"""Sound-class metadata: label sets, the AudioSet ontology tree, and where their files live.

- :class:`LabelSet` is the ordered list of classes a model predicts (AudioSet's 527, a subset, or
  a user's own CSV in the ``class_labels_indices.csv`` format). Labels resolve from display
  names or mids, exactly first, then case-insensitively, with suggestions when nothing matches.
- :class:`Ontology` is the AudioSet ontology tree built as the reference builds it, for
  hierarchical separation (all classes under a node at a given level).
- :func:`safe_filename` turns any label into a file name that is valid on every OS.

The metadata files (``ontology.json``, ``class_labels_indices.csv``, Google, CC BY-SA 4.0) are
not shipped; ``uss metadata fetch`` downloads them into :func:`metadata_dir`.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import operator
import os
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

from uss_core.errors import LabelError, MetadataError
from uss_core.files import atomic_path

ONTOLOGY_FILENAME = "ontology.json"
LABELS_FILENAME = "class_labels_indices.csv"
LABELS_CSV_HEADER = ("index", "mid", "display_name")
METADATA_DIR_ENV = "USS_METADATA_DIR"
FETCH_HINT = "run `uss metadata fetch` or pass --metadata-dir / set USS_METADATA_DIR"

# The synthetic root of the reference's tree (level 0) and its children, the 7 top categories.
ROOT_MID = "root"
ROOT_CATEGORY_MIDS = (
    "/m/0dgw9r",  # Human sounds
    "/m/0jbk",  # Animal
    "/m/04rlf",  # Music
    "/m/059j3w",  # Natural sounds
    "/t/dd00041",  # Sounds of things
    "/t/dd00098",  # Source-ambiguous sounds
    "/t/dd00123",  # Channel, environment and background
)


# ---------------------------------------------------------------------------------------------
# Where the metadata lives


def metadata_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The metadata folder: ``explicit`` (a command-line flag), else ``$USS_METADATA_DIR``, else
    ``$XDG_CACHE_HOME/uss-at-scale/metadata`` (``~/.cache/...`` when XDG_CACHE_HOME is unset)."""
    if explicit:
        return Path(explicit).expanduser()
    if os.environ.get(METADATA_DIR_ENV):
        return Path(os.environ[METADATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore a relative XDG_CACHE_HOME.
    cache_root = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return cache_root / "uss-at-scale" / "metadata"


def metadata_file(filename: str, directory: str | os.PathLike | None = None) -> Path:
    """Path of the metadata file ``filename`` in :func:`metadata_dir`; MetadataError if missing."""
    folder = metadata_dir(directory)
    path = folder / filename
    if not path.is_file():
        raise MetadataError(f"AudioSet {filename} not found in {folder}; {FETCH_HINT}")
    return path


# ---------------------------------------------------------------------------------------------
# Resolving user text to a class or node (shared by LabelSet and Ontology)


def _resolve_position(text: str, names: Sequence[str], mids: Sequence[str], kind: str) -> int:
    """Position of ``text`` among entries with these names and mids.

    Tried in order: exact name, exact mid, case-insensitive name. Several matches at one step
    are ambiguous; no match raises LabelError with the closest names as suggestions.
    """
    folded = text.strip().casefold()
    for matches in (
        [i for i, name in enumerate(names) if name == text],
        [i for i, mid in enumerate(mids) if mid == text],
        [i for i, name in enumerate(names) if name.strip().casefold() == folded],
    ):
        if len(matches) == 1:
            return matches[0]
        if matches:
            listed = ", ".join(f"{names[i]!r} ({mids[i]})" for i in matches)
            raise LabelError(f"{kind} {text!r} is ambiguous, it matches {listed}; give the mid instead")
    by_folded_name = {}
    for name in names:
        by_folded_name.setdefault(name.casefold(), name)
    close = difflib.get_close_matches(folded, list(by_folded_name), n=5, cutoff=0.6)
    if close:
        suggestions = ", ".join(repr(by_folded_name[c]) for c in close)
        raise LabelError(f"unknown {kind} {text!r}; did you mean: {suggestions}?")
    if folded.lstrip("+-").isdigit():
        raise LabelError(
            f"unknown {kind} {text!r}: {kind}s are display names or mids, not numbers; to pick a class "
            f"by its index, pass the integer (e.g. --class-id {text.strip()})"
        )
    raise LabelError(f"unknown {kind} {text!r}; give a display name or mid (none is similar to this one)")


# ---------------------------------------------------------------------------------------------
# Label sets


@dataclass(frozen=True)
class LabelSet:
    """The ordered classes of a model: class ``i`` has mid ``mids[i]`` and name ``names[i]``.

    Mids must be unique; names need not be (an ambiguous name then asks for the mid).
    """

    mids: tuple[str, ...]
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        # Accept any sequences, store tuples, so label sets stay hashable and immutable.
        object.__setattr__(self, "mids", tuple(self.mids))
        object.__setattr__(self, "names", tuple(self.names))
        if len(self.mids) != len(self.names):
            raise LabelError(f"label set has {len(self.mids)} mids but {len(self.names)} names")
        if not self.mids:
            raise LabelError("label set is empty; it needs at least one class")
        for i, (mid, name) in enumerate(zip(self.mids, self.names)):
            if not isinstance(mid, str) or not isinstance(name, str) or not mid.strip() or not name.strip():
                raise LabelError(f"class {i} needs a non-empty mid and name, got mid={mid!r} name={name!r}")
        first_index: dict[str, int] = {}
        for i, mid in enumerate(self.mids):
            if mid in first_index:
                raise LabelError(f"mid {mid!r} appears twice (classes {first_index[mid]} and {i}); mids must be unique")
            first_index[mid] = i

    def __len__(self) -> int:
        return len(self.mids)

    @cached_property
    def _index_by_mid(self) -> dict[str, int]:
        return {mid: i for i, mid in enumerate(self.mids)}

    def has_mid(self, mid: str) -> bool:
        return mid in self._index_by_mid

    def index_of_mid(self, mid: str) -> int:
        """Class index of ``mid``; LabelError if the label set does not have it."""
        try:
            return self._index_by_mid[mid]
        except KeyError:
            raise LabelError(f"mid {mid!r} is not in this label set ({len(self)} classes)") from None

    def resolve_index(self, index: int) -> int:
        """``index`` itself, after checking it is a valid class index (LabelError if not)."""
        if isinstance(index, bool):
            raise LabelError(f"class index must be an integer, got {index!r}")
        try:
            value = operator.index(index)
        except TypeError:
            raise LabelError(f"class index must be an integer, got {index!r}") from None
        if not 0 <= value < len(self):
            raise LabelError(f"class index {value} is out of range; this label set has classes 0-{len(self) - 1}")
        return value

    def name_of(self, index: int) -> str:
        return self.names[self.resolve_index(index)]

    def resolve(self, text: str) -> int:
        """Class index of a display name or mid: exact name, then mid, then case-insensitive name.

        A number in a string is not taken as an index (use :meth:`resolve_index`). Unknown text
        raises LabelError with suggestions, e.g. "unknown label 'Pianoo'; did you mean: 'Piano'?".
        """
        return _resolve_position(text, self.names, self.mids, "label")

    def subset(self, indexes: Iterable[int]) -> LabelSet:
        """The label set of the given classes, in the given order."""
        chosen = [self.resolve_index(i) for i in indexes]
        return LabelSet(tuple(self.mids[i] for i in chosen), tuple(self.names[i] for i in chosen))

    def to_records(self) -> list[dict[str, str]]:
        """``[{"mid": ..., "name": ...}, ...]`` in class order (for JSON configs)."""
        return [{"mid": mid, "name": name} for mid, name in zip(self.mids, self.names)]

    @classmethod
    def from_records(cls, records: Sequence[dict]) -> LabelSet:
        """Inverse of :meth:`to_records`."""
        try:
            return cls(tuple(r["mid"] for r in records), tuple(r["name"] for r in records))
        except (KeyError, TypeError):
            raise LabelError("label records must be a list of {'mid': ..., 'name': ...} objects") from None

    @classmethod
    def parse_csv(cls, text: str, source: str) -> LabelSet:
        """Parse ``class_labels_indices.csv`` text (header ``index,mid,display_name``; indexes
        count up from 0). ``source`` names the file in MetadataError messages."""
        what_to_do = "fix the file (header index,mid,display_name, one row per class from index 0)"
        rows = list(csv.reader(io.StringIO(text)))
        if not rows or tuple(cell.strip() for cell in rows[0]) != LABELS_CSV_HEADER:
            raise MetadataError(f"{source}: first line must be 'index,mid,display_name'; {what_to_do}")
        mids: list[str] = []
        names: list[str] = []
        for line, row in enumerate(rows[1:], start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 3:
                raise MetadataError(f"{source}, line {line}: expected 3 columns, got {len(row)}; {what_to_do}")
            index, mid, name = (cell.strip() for cell in row)
            if index != str(len(mids)):
                raise MetadataError(f"{source}, line {line}: index {index!r}, expected {len(mids)}; {what_to_do}")
            mids.append(mid)
            names.append(name)
        try:
            return cls(tuple(mids), tuple(names))
        except LabelError as exc:
            raise MetadataError(f"{source}: {exc}; {what_to_do}") from None

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> LabelSet:
        """Read a label set from a ``class_labels_indices.csv``-format file."""
        path = Path(path)
        if not path.is_file():
            raise MetadataError(f"label list {path} not found; check the path")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise MetadataError(f"{path}: cannot read the label list ({exc}); it must be UTF-8 text") from None
        return cls.parse_csv(text, str(path))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the label set atomically in ``class_labels_indices.csv`` format; returns ``path``."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(LABELS_CSV_HEADER)
        writer.writerows((i, mid, name) for i, (mid, name) in enumerate(zip(self.mids, self.names)))
        with atomic_path(path) as temp:
            temp.write_text(buffer.getvalue(), encoding="utf-8")
        return Path(path)


def load_label_set(
    metadata_dir: str | os.PathLike | None = None, labels_csv: str | os.PathLike | None = None
) -> LabelSet:
    """``labels_csv`` if given, else the AudioSet label list in the metadata folder."""
    if labels_csv is not None:
        return LabelSet.from_csv(labels_csv)
    return LabelSet.from_csv(metadata_file(LABELS_FILENAME, metadata_dir))


# ---------------------------------------------------------------------------------------------
# The ontology


@dataclass(frozen=True)
class OntologyNode:
    """A node of the ontology tree; ``children`` are the mids attached under it in the tree
    (a class with several parents in ontology.json sits under one of them only)."""

    mid: str
    name: str
    level: int
    children: tuple[str, ...]
    parent: str | None


class Ontology:
    """The AudioSet ontology tree, exactly as the reference (``uss/parse_ontology.py``) builds it.

    A synthetic root (mid :data:`ROOT_MID`, level 0) has the 7 top categories as children (level
    1). Each ontology.json entry, in file order, hangs under the first node, in pre-order, of the
    tree built so far that lists it among its ``child_ids``. Node order everywhere is that
    pre-order traversal.
    """

    def __init__(self, nodes: Sequence[OntologyNode]) -> None:
        """``nodes`` in pre-order, the root first (use :meth:`from_entries` to build them)."""
        self._preorder = tuple(nodes)
        self._position = {node.mid: i for i, node in enumerate(self._preorder)}
        # A subtree is a contiguous run of the pre-order; it ends where the next node at the
        # same or a higher level starts.
        self._subtree_end: dict[str, int] = {}
        open_nodes: list[OntologyNode] = []
        for i, node in enumerate(self._preorder):
            while open_nodes and open_nodes[-1].level >= node.level:
                self._subtree_end[open_nodes.pop().mid] = i
            open_nodes.append(node)
        for node in open_nodes:
            self._subtree_end[node.mid] = len(self._preorder)
        self._named = self._preorder[1:]

    @classmethod
    def from_entries(cls, entries: Sequence[dict], source: str) -> Ontology:
        """Build the tree from the parsed ontology.json list; ``source`` names it in errors."""
        if not isinstance(entries, list) or not entries:
            raise MetadataError(f"{source}: expected a non-empty JSON list of ontology nodes; {FETCH_HINT}")
        names = {ROOT_MID: "root"}
        children: dict[str, list[str]] = {ROOT_MID: []}
        parents: dict[str, str | None] = {ROOT_MID: None}
        levels = {ROOT_MID: 0}
        # Pre-order rank of a tree node = the tuple of child positions on its path from the root;
        # appending children never changes the rank order of nodes already in the tree.
        rank: dict[str, tuple[int, ...]] = {ROOT_MID: ()}
        listed_by: dict[str, list[str]] = defaultdict(list)  # mid -> tree nodes listing it as a child
        for mid in ROOT_CATEGORY_MIDS:
            listed_by[mid].append(ROOT_MID)
        for number, entry in enumerate(entries):
            try:
                mid, name, child_ids = entry["id"], entry["name"], list(entry["child_ids"])
                if not all(isinstance(v, str) for v in (mid, name, *child_ids)):
                    raise TypeError
            except (KeyError, TypeError):
                raise MetadataError(
                    f"{source}: entry {number} is not an ontology node (needs string 'id', 'name' and a "
                    f"'child_ids' list); {FETCH_HINT}"
                ) from None
            if mid in rank:
                raise MetadataError(f"{source}: node {mid} ({name}) appears twice; {FETCH_HINT}")
            if not listed_by[mid]:
                raise MetadataError(
                    f"{source}: node {mid} ({name}) has no parent listed before it and is not a top "
                    f"category; {FETCH_HINT}"
                )
            parent = min(listed_by[mid], key=rank.__getitem__)
            rank[mid] = rank[parent] + (len(children[parent]),)
            children[parent].append(mid)
            children[mid] = []
            names[mid], parents[mid], levels[mid] = name, parent, levels[parent] + 1
            for child in child_ids:
                listed_by[child].append(mid)
        preorder = sorted(rank, key=rank.__getitem__)
        return cls(
            [OntologyNode(mid, names[mid], levels[mid], tuple(children[mid]), parents[mid]) for mid in preorder]
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Ontology:
        """Read ontology.json."""
        path = Path(path)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MetadataError(f"{path}: cannot read the ontology ({exc}); {FETCH_HINT}") from None
        return cls.from_entries(entries, str(path))

    @property
    def root(self) -> OntologyNode:
        return self._preorder[0]

    @property
    def max_level(self) -> int:
        return max(node.level for node in self._preorder)

    def _position_of(self, mid: str) -> int:
        try:
            return self._position[mid]
        except KeyError:
            raise LabelError(f"no ontology node has mid {mid!r}; use resolve_node() to look up names") from None

    def node(self, mid: str) -> OntologyNode:
        """The node with this mid; LabelError if there is none."""
        return self._preorder[self._position_of(mid)]

    def nodes_at_level(self, level: int) -> list[OntologyNode]:
        """Nodes at ``level`` (1 = the 7 top categories), in pre-order."""
        return [node for node in self._preorder if node.level == level]

    def subtree_mids(self, mid: str) -> list[str]:
        """Mids of the subtree under ``mid``, pre-order, ``mid`` itself first."""
        start = self._position_of(mid)
        return [node.mid for node in self._preorder[start : self._subtree_end[mid]]]

    def subtree_indexes(self, mid: str, label_set: LabelSet) -> list[int]:
        """Class indexes in ``label_set`` of the subtree under ``mid`` (pre-order; mids the label
        set lacks are skipped), as the reference's ``get_children_indexes``."""
        return [label_set.index_of_mid(m) for m in self.subtree_mids(mid) if label_set.has_mid(m)]

    def resolve_node(self, text: str) -> OntologyNode:
        """The node named by a display name or mid (same rules and errors as :meth:`LabelSet.resolve`)."""
        position = _resolve_position(
            text, [n.name for n in self._named], [n.mid for n in self._named], "ontology node"
        )
        return self._named[position]


def load_ontology(metadata_dir: str | os.PathLike | None = None) -> Ontology:
    """The AudioSet ontology from ``ontology.json`` in the metadata folder."""
    return Ontology.from_json(metadata_file(ONTOLOGY_FILENAME, metadata_dir))


# ---------------------------------------------------------------------------------------------
# File names

MAX_FILENAME_BYTES = 120
_FORBIDDEN_CHARACTERS = frozenset('/\\:*?"<>|')
_WINDOWS_RESERVED_NAMES = frozenset(
    {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"}
    | {f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"}
)


def safe_filename(label: str) -> str:
    """A readable file name for ``label`` that is valid on Linux, macOS and Windows.

    Characters no OS allows (``/ \\ : * ? " < > |``, lone surrogates) become ``_``; control
    characters and any whitespace become single spaces; invisible format characters are dropped;
    leading and trailing dots and spaces are stripped; a Windows device name (``CON``,
    ``com1.x``, ...) gets a ``_`` after it; names longer than :data:`MAX_FILENAME_BYTES` (UTF-8)
    are cut and end in ``-`` plus a short hash of the label, so distinct labels stay distinct.
    Never empty; applying it twice changes nothing. Extensions can be appended safely.
    """
    pieces = []
    for ch in unicodedata.normalize("NFC", label):
        category = unicodedata.category(ch)
        if ch in _FORBIDDEN_CHARACTERS or category == "Cs":
            pieces.append("_")
        elif ch.isspace() or category in ("Cc", "Zl", "Zp"):
            pieces.append(" ")
        elif category != "Cf":
            pieces.append(ch)
    name = " ".join("".join(pieces).split()).strip(" .")
    digest = hashlib.sha1(label.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if not name:
        return f"unnamed-{digest}"
    stem, dot, rest = name.partition(".")
    if stem.rstrip(" ").upper() in _WINDOWS_RESERVED_NAMES:
        name = f"{stem}_{dot}{rest}"
    if len(name.encode("utf-8")) > MAX_FILENAME_BYTES:
        kept = name.encode("utf-8")[: MAX_FILENAME_BYTES - len(digest) - 1].decode("utf-8", "ignore")
        name = f"{kept.rstrip(' .')}-{digest}"
    return name
