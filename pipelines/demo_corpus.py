"""The embedded demo corpus: a mini-AudioSet that a fresh machine builds with pip alone.

Real recorded sounds, no download: the General MIDI soundfont ``TimGM6mb.sf2`` shipped inside
the ``pretty_midi`` wheel, rendered with ``tinysoundfont`` (sampled instruments, drum kits and
the GM sound effects: bird tweet, telephone, helicopter, applause, gunshot, seashore), and
speech from eSpeak NG (``espeakng-loader``: many languages, voice variants, rates and pitches).

Each clip is ``clip_seconds`` (10 s) of 32-kHz mono audio: one to three events of distinct
classes at random onsets over a quiet pink/brown-noise background. Every event is rendered to
sound like its class (melodic phrases in the instrument's register at a random tempo and key,
drum patterns, effects with their natural durations), trimmed to where it is audible, faded in
and out, and normalised to a random loudness. Only clip-level labels go into the shards (weak
labels, as in AudioSet); the true event times go into ``events.parquet`` for evaluation only.

Layout of ``out_dir``::

    shards/demo-00000.tar   WebDataset shards: per clip ``{clip_id}.flac`` (16-bit FLAC) and
    shards/demo-00001.tar   ``{clip_id}.json`` = {"clip_id", "labels": [mid, ...], "sample_rate"}
    events.parquet          EVENT_SCHEMA: one row per event (strong labels, evaluation only)
    labels.csv              the demo's label set, class_labels_indices.csv format
    corpus.json             seed, config, counts, classes, sources and their licenses
    README.txt              the same for people

Determinism: clip ``i`` is rendered from ``numpy.random.SeedSequence([seed, i])`` alone, so the
same seed gives byte-identical shards whatever the number of worker processes. eSpeak NG keeps
internal state across utterances, so every utterance is synthesised in a forked child of a
process that never synthesised (POSIX only). Byte identity holds for the same versions of
numpy, libsndfile, tinysoundfont and espeakng-loader (recorded in ``corpus.json``).

Class ids: the AudioSet mids and display names are read from ``class_labels_indices.csv`` in
the metadata folder (``metadata_dir`` argument, else ``$USS_METADATA_DIR``, else the default of
:func:`uss_core.ontology.metadata_dir`); when none has it, the built-in ids of
:data:`SOUND_RECIPES` (checked against the CSV whenever it is there) are used, so a fresh
machine needs no download. ``ontology.json``, when present, adds each class's ontology
ancestors to ``corpus.json``.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import io
import json
import math
import multiprocessing
import os
import sys
import tarfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from uss_core import ontology
from uss_core.errors import ConfigError, MetadataError, UssError
from uss_core.files import atomic_path

CORPUS_NAME = "uss-demo"
CORPUS_VERSION = 1
SHARD_PATTERN = "demo-{shard:05d}.tar"
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so shards are byte-identical

# --------------------------------------------------------------------------------------------
# Classes and how each one sounds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SoundRecipe:
    """How events of one class are rendered.

    ``kind``: ``"speech"`` (eSpeak NG), ``"drums"`` (GM drum kit, bank 128, channel 9),
    ``"melodic"`` (GM ``programs`` playing ``styles`` in the MIDI key range ``register``) or an
    effect (``"bird"``, ``"telephone"``, ``"helicopter"``, ``"applause"``, ``"gunshot"``,
    ``"waves"``) played on its GM program. ``seconds``: the class's natural event length range,
    intersected with the corpus config's (gunshots are short, helicopters long).
    """

    mid: str  # AudioSet machine id (used only when no metadata is available)
    kind: str
    programs: tuple[int, ...] = ()
    register: tuple[int, int] = (48, 84)
    styles: tuple[str, ...] = ()
    tempo: tuple[float, float] = (70.0, 150.0)
    seconds: tuple[float, float] | None = None


SOUND_RECIPES: dict[str, SoundRecipe] = {
    "Speech": SoundRecipe("/m/09x0r", "speech"),
    "Piano": SoundRecipe("/m/05r5c", "melodic", (0, 1, 2), (36, 88), ("piano", "melody", "arpeggio")),
    "Organ": SoundRecipe("/m/013y1f", "melodic", (16, 17, 18, 19), (43, 84), ("pad", "piano")),
    "Acoustic guitar": SoundRecipe("/m/042v_gx", "melodic", (24, 25), (40, 76), ("strum", "arpeggio", "melody")),
    "Electric guitar": SoundRecipe("/m/02sgy", "melodic", (26, 27, 29, 30), (40, 79), ("strum", "melody", "power")),
    "Bass guitar": SoundRecipe("/m/018vs", "melodic", (33, 34, 35), (28, 52), ("bass",)),
    "Violin, fiddle": SoundRecipe("/m/07y_7", "melodic", (40, 110), (55, 91), ("melody",)),
    "Cello": SoundRecipe("/m/01xqw", "melodic", (42,), (36, 69), ("melody",), (50.0, 120.0)),
    "Trumpet": SoundRecipe("/m/07gql", "melodic", (56, 59), (55, 82), ("melody",)),
    "Flute": SoundRecipe("/m/0l14j_", "melodic", (73,), (60, 93), ("melody",)),
    "Saxophone": SoundRecipe("/m/06ncr", "melodic", (64, 65, 66), (46, 80), ("melody",)),
    "Clarinet": SoundRecipe("/m/01wy6", "melodic", (71,), (50, 86), ("melody",)),
    "Harp": SoundRecipe("/m/03m5k", "melodic", (46,), (36, 91), ("arpeggio", "melody")),
    "Drum kit": SoundRecipe("/m/02hnl", "drums", (0, 8, 16, 32, 40), tempo=(80.0, 170.0)),
    "Marimba, xylophone": SoundRecipe("/m/0dwsp", "melodic", (12, 13), (53, 96), ("melody", "arpeggio"), (90.0, 170.0)),
    "Accordion": SoundRecipe("/m/0mkg", "melodic", (21, 23), (53, 81), ("piano", "melody")),
    "Harmonica": SoundRecipe("/m/03qjg", "melodic", (22,), (60, 84), ("melody",)),
    "Choir": SoundRecipe("/m/0l14jd", "melodic", (52, 53), (48, 79), ("choir",), (50.0, 100.0)),
    "Bird vocalization, bird call, bird song": SoundRecipe("/m/020bb7", "bird", (123,)),
    "Telephone bell ringing": SoundRecipe("/m/07pp8cl", "telephone", (124,), seconds=(2.0, 8.0)),
    "Helicopter": SoundRecipe("/m/09ct_", "helicopter", (125,), seconds=(3.5, 10.0)),
    "Applause": SoundRecipe("/m/028ght", "applause", (126,), seconds=(2.0, 10.0)),
    "Gunshot, gunfire": SoundRecipe("/m/032s66", "gunshot", (127,), seconds=(0.5, 3.0)),
    "Waves, surf": SoundRecipe("/m/034srq", "waves", (122,), seconds=(3.0, 10.0)),
}

DEFAULT_CLASSES: tuple[str, ...] = tuple(SOUND_RECIPES)


@dataclass(frozen=True)
class DemoClass:
    """One class of the demo label set: its index in the demo set and its AudioSet ids."""

    index: int  # position in the demo label set (labels.csv)
    mid: str
    display_name: str
    audioset_index: int | None  # row in class_labels_indices.csv (None without metadata)
    ancestors: tuple[str, ...] = ()  # ontology ancestors' display names, nearest first


@dataclass
class DemoCorpusConfig:
    """What the demo corpus holds. Same config (seed included) -> byte-identical corpus."""

    num_clips: int = 400
    clips_per_shard: int = 100
    seed: int = 1234
    clip_seconds: float = 10.0
    sample_rate: int = 32000
    min_events: int = 1
    max_events: int = 3
    min_event_seconds: float = 1.0
    max_event_seconds: float = 6.0
    classes: tuple[str, ...] = DEFAULT_CLASSES
    event_level_dbfs: tuple[float, float] = (-26.0, -14.0)  # gated RMS of each event
    background_level_dbfs: tuple[float, float] = (-50.0, -40.0)  # RMS of the noise floor

    def validate(self) -> None:
        """Raise :class:`ConfigError` for an impossible configuration."""
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"demo corpus: {msg}")

        if self.num_clips < 1:
            raise bad(f"num_clips must be >= 1, got {self.num_clips}")
        if self.clips_per_shard < 1:
            raise bad(f"clips_per_shard must be >= 1, got {self.clips_per_shard}")
        if self.sample_rate < 8000:
            raise bad(f"sample_rate must be >= 8000 Hz, got {self.sample_rate}")
        if not 1 <= self.min_events <= self.max_events:
            raise bad(f"need 1 <= min_events <= max_events, got {self.min_events}, {self.max_events}")
        if not 0.1 <= self.min_event_seconds <= self.max_event_seconds <= self.clip_seconds:
            raise bad(
                "need 0.1 <= min_event_seconds <= max_event_seconds <= clip_seconds, got "
                f"{self.min_event_seconds}, {self.max_event_seconds}, {self.clip_seconds}"
            )
        unknown = [c for c in self.classes if c not in SOUND_RECIPES]
        if unknown:
            raise bad(f"no sound recipe for {unknown}; known classes: {list(SOUND_RECIPES)}")
        if len(set(self.classes)) != len(self.classes):
            raise bad("classes has duplicates")
        if self.max_events > len(self.classes):
            raise bad(f"max_events ({self.max_events}) > number of classes ({len(self.classes)})")
        for name in ("event_level_dbfs", "background_level_dbfs"):
            lo, hi = getattr(self, name)
            if not -90.0 <= lo <= hi <= 0.0:
                raise bad(f"{name} must be a range within [-90, 0] dBFS, got ({lo}, {hi})")

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_clips / self.clips_per_shard)


@dataclass
class DemoCorpusSummary:
    """What :func:`build_demo_corpus` wrote."""

    out_dir: Path
    num_clips: int
    num_shards: int
    num_events: int
    num_classes: int
    shard_paths: list[Path]
    events_path: Path
    labels_path: Path
    corpus_json_path: Path
    readme_path: Path
    audio_seconds: float
    seconds: float  # wall-clock build time
    clips_per_class: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"demo corpus in {self.out_dir}",
            f"  {self.num_clips} clips ({self.audio_seconds / 60:.1f} min of audio), "
            f"{self.num_events} events, {self.num_classes} classes, {self.num_shards} shards",
            f"  shards:  {self.out_dir / 'shards'}/demo-*.tar",
            f"  events:  {self.events_path}",
            f"  labels:  {self.labels_path}",
            f"  corpus:  {self.corpus_json_path}",
            f"  built in {self.seconds:.1f} s",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Label metadata
# --------------------------------------------------------------------------------------------


def find_metadata_dir(metadata_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder holding AudioSet's ``class_labels_indices.csv`` for the demo's class ids.

    ``metadata_dir`` (a flag) or ``$USS_METADATA_DIR`` must hold the file (MetadataError if
    not); the default metadata folder (:func:`uss_core.ontology.metadata_dir`) is used if it
    holds it; otherwise None (the built-in ids of :data:`SOUND_RECIPES` are used).
    """
    folder = ontology.metadata_dir(metadata_dir)
    if (folder / ontology.LABELS_FILENAME).is_file():
        return folder
    if metadata_dir or os.environ.get(ontology.METADATA_DIR_ENV):
        raise MetadataError(f"AudioSet {ontology.LABELS_FILENAME} not found in {folder}; {ontology.FETCH_HINT}")
    return None


def resolve_demo_classes(
    names: tuple[str, ...] | list[str], metadata_dir: str | os.PathLike | None = None
) -> list[DemoClass]:
    """The demo label set: ``names`` (AudioSet display names, in this order) with their ids.

    Mids come from ``class_labels_indices.csv`` in :func:`find_metadata_dir` (MetadataError if
    a name is missing there or its mid differs from the built-in one), else from the built-in
    table; ``ontology.json`` beside the CSV, if present, gives each class's ancestors.
    """
    folder = find_metadata_dir(metadata_dir)
    if folder is None:
        return [DemoClass(i, SOUND_RECIPES[n].mid, n, None) for i, n in enumerate(names)]
    labels = ontology.load_label_set(folder)
    tree = ontology.load_ontology(folder) if (folder / ontology.ONTOLOGY_FILENAME).is_file() else None
    classes = []
    for i, name in enumerate(names):
        matches = [j for j, n in enumerate(labels.names) if n == name]
        if len(matches) != 1:
            raise MetadataError(f"class {name!r} is not (exactly once) in {folder / ontology.LABELS_FILENAME}")
        index = matches[0]
        mid = labels.mids[index]
        if name in SOUND_RECIPES and SOUND_RECIPES[name].mid != mid:
            raise MetadataError(
                f"{folder / ontology.LABELS_FILENAME} gives {name!r} the mid {mid}, "
                f"expected {SOUND_RECIPES[name].mid}"
            )
        classes.append(DemoClass(i, mid, name, index, _ancestors(tree, mid)))
    return classes


def _ancestors(tree: ontology.Ontology | None, mid: str) -> tuple[str, ...]:
    """Display names of the ontology-tree ancestors of ``mid``, nearest first (root excluded)."""
    chain: list[str] = []
    if tree is None:
        return ()
    try:
        node = tree.node(mid)
    except UssError:
        return ()
    while node.parent is not None and node.parent != ontology.ROOT_MID:
        node = tree.node(node.parent)
        chain.append(node.name)
    return tuple(chain)


# --------------------------------------------------------------------------------------------
# Sound sources: the GM soundfont and eSpeak NG (both cached per process)
# --------------------------------------------------------------------------------------------

INSTALL_HINT = (
    "the demo corpus needs pretty_midi (for its soundfont), tinysoundfont and espeakng-loader: "
    "pip install pretty_midi==0.2.11 espeakng-loader==0.2.4 && pip install --no-deps tinysoundfont==0.3.7"
)


def soundfont_path() -> Path:
    """``TimGM6mb.sf2`` inside the installed pretty_midi package (found without importing it)."""
    spec = importlib.util.find_spec("pretty_midi")
    if spec is None or spec.origin is None:
        raise UssError(f"pretty_midi is not installed; {INSTALL_HINT}")
    path = Path(spec.origin).parent / "TimGM6mb.sf2"
    if not path.is_file():
        raise UssError(f"{path} not found in the pretty_midi package; {INSTALL_HINT}")
    return path


@lru_cache(maxsize=1)
def _soundfont_bytes() -> bytes:
    return soundfont_path().read_bytes()


def _tinysoundfont():
    try:
        import tinysoundfont
    except ImportError as exc:
        raise UssError(f"tinysoundfont is not installed; {INSTALL_HINT}") from exc
    return tinysoundfont


Note = tuple[float, float, int, int]  # (start seconds, end seconds, MIDI key, velocity 1-127)


def render_notes(
    notes: list[Note], program: int, seconds: float, sample_rate: int, drums: bool = False, bank: int = 0
) -> np.ndarray:
    """Render MIDI notes on one GM program (or drum kit ``program`` if ``drums``) to mono.

    A fresh synthesizer per call (parsing the cached soundfont bytes takes ~15 ms), so the
    result depends on the arguments only. Returns float32 ``(round(seconds * sample_rate),)``.
    """
    tsf = _tinysoundfont()
    synth = tsf.Synth(samplerate=sample_rate)
    sfid = synth.sfload(_soundfont_bytes())
    chan = 9 if drums else 0
    synth.program_select(chan, sfid, 128 if drums else bank, program, is_drums=drums)
    total = int(round(seconds * sample_rate))
    actions: list[tuple[int, int, int, int]] = []  # (sample, 0=off / 1=on, key, velocity)
    for start, end, key, vel in notes:
        s0 = min(max(int(round(start * sample_rate)), 0), total)
        s1 = min(max(int(round(end * sample_rate)), s0 + 1), total)
        if s0 >= total:
            continue
        actions.append((s0, 1, key, int(min(max(vel, 1), 127))))
        actions.append((s1, 0, key, 0))
    actions.sort()
    out = bytearray(total * 8)
    view = memoryview(out)
    pos = 0
    for sample, on, key, vel in actions + [(total, -1, 0, 0)]:
        if sample > pos:
            synth.generate_simple(sample - pos, buffer=view[pos * 8 : sample * 8])
            pos = sample
        if on == 1:
            synth.noteon(chan, key, vel)
        elif on == 0:
            synth.noteoff(chan, key)
    stereo = np.frombuffer(bytes(out), dtype=np.float32).reshape(-1, 2)
    return stereo.mean(axis=1).astype(np.float32)


class _ESpeak:
    """eSpeak NG through its C API (ctypes), loaded and initialised once per process.

    eSpeak keeps synthesis state (filters, noise generator, ...) across utterances even over
    Terminate/Initialize, so each utterance is synthesised in a forked child of this process,
    which itself never synthesises: every utterance starts from the same state.
    """

    RATE, VOLUME, PITCH, RANGE = 1, 2, 3, 4  # espeak_PARAMETER
    _SYNTH_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise UssError(f"espeakng-loader is not installed; {INSTALL_HINT}") from exc
        if not hasattr(os, "fork"):
            raise UssError("the demo corpus's speech needs os.fork (Linux or macOS)")
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        # AUDIO_OUTPUT_SYNCHRONOUS = 2; espeakINITIALIZE_DONT_EXIT = 0x8000
        rate = lib.espeak_Initialize(2, 0, str(espeakng_loader.get_data_path()).encode(), 0x8000)
        if rate <= 0:
            raise UssError(f"eSpeak NG failed to initialise (status {rate})")
        self.lib, self.libc, self.sample_rate = lib, ctypes.CDLL(None), rate

    def synthesize(self, text: str, voice: str, rate: int, pitch: int, pitch_range: int) -> np.ndarray:
        """Speak ``text``; returns int16 ``(samples,)`` at :attr:`sample_rate` (22050 Hz)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: synthesise, write the samples to the pipe, exit without cleanup
            status = 1
            try:
                os.close(r)
                chunks: list[bytes] = []

                def on_audio(wav, n, _events):
                    if wav and n > 0:
                        chunks.append(ctypes.string_at(wav, 2 * n))
                    return 0

                callback = self._SYNTH_CB(on_audio)
                lib = self.lib
                lib.espeak_SetSynthCallback(callback)
                lib.espeak_ng_SetRandSeed(12345)
                self.libc.srand(12345)
                if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                    raise RuntimeError(f"unknown eSpeak voice {voice}")
                settings = ((self.RATE, rate), (self.VOLUME, 100), (self.PITCH, pitch), (self.RANGE, pitch_range))
                for param, value in settings:
                    lib.espeak_SetParameter(param, value, 0)
                data = text.encode("utf-8") + b"\0"
                lib.espeak_Synth(data, len(data), 0, 1, 0, 0, None, None)  # POS_CHARACTER, CHARS_AUTO
                lib.espeak_Synchronize()
                payload = b"".join(chunks)
                view, done = memoryview(payload), 0
                while done < len(payload):
                    done += os.write(w, view[done:])
                status = 0
            finally:
                os._exit(status)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            payload = f.read()
        _, status = os.waitpid(pid, 0)
        if status != 0:
            raise UssError(f"eSpeak NG failed to speak with voice {voice!r} (child status {status})")
        return np.frombuffer(payload, dtype=np.int16)


@lru_cache(maxsize=1)
def _espeak() -> _ESpeak:
    return _ESpeak()


# Sentences written for this corpus (public domain), per eSpeak language.
SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "The quick brown fox jumps over the lazy dog.",
        "Could you tell me the way to the railway station, please?",
        "We will meet again tomorrow morning at half past nine.",
        "It has been raining all week, but the garden looks wonderful.",
        "Please remember to switch off the lights before you leave.",
        "The museum opens at ten and closes late on Fridays.",
        "I think the meeting went rather well, all things considered.",
        "Turn left at the bakery and keep going until you see the river.",
        "She bought three apples, a loaf of bread and some cheese.",
        "Ladies and gentlemen, the next train will arrive in five minutes.",
        "My brother has been learning to play the violin since last spring.",
        "Do you know whether the library is open on Sundays?",
        "The weather forecast says it will be sunny and warm this afternoon.",
        "After dinner we walked along the beach and watched the sunset.",
        "Thank you very much for your help, I really appreciate it.",
        "The results of the experiment were published in a short report.",
        "Welcome back, everybody. Today we are going to talk about sound.",
        "If the phone rings, please take a message and I will call back.",
    ),
    "de": (
        "Guten Morgen, wie geht es Ihnen heute?",
        "Der Zug nach Berlin fährt in zehn Minuten von Gleis drei ab.",
        "Wir treffen uns morgen Abend vor dem alten Rathaus.",
        "Das Wetter ist schön, also gehen wir im Park spazieren.",
        "Können Sie mir bitte sagen, wo die nächste Apotheke ist?",
    ),
    "fr": (
        "Bonjour à tous, merci d'être venus si nombreux ce soir.",
        "Le train pour Lyon partira avec quelques minutes de retard.",
        "Nous avons passé une très belle journée au bord de la mer.",
        "Pourriez-vous répéter la question, s'il vous plaît?",
        "La bibliothèque est fermée le dimanche et le lundi matin.",
    ),
    "es": (
        "Buenos días, ¿cómo está usted esta mañana?",
        "El autobús número doce llega a la plaza cada quince minutos.",
        "Mañana vamos a visitar a mis abuelos en el campo.",
        "Por favor, cierre la puerta cuando salga de la habitación.",
        "La película empieza a las ocho y media de la tarde.",
    ),
    "it": (
        "Buongiorno, vorrei un caffè e una brioche, per favore.",
        "Il treno per Roma è in partenza dal binario quattro.",
        "Domani pomeriggio andiamo tutti insieme al mare.",
        "Scusi, sa dirmi dove si trova la stazione?",
    ),
    "pt": (
        "Bom dia, tudo bem com você?",
        "O próximo ônibus para o centro sai daqui a dez minutos.",
        "Vamos almoçar juntos no restaurante da esquina.",
        "Amanhã vai fazer sol durante toda a manhã.",
    ),
    "nl": (
        "Goedemorgen, mag ik een kopje koffie, alstublieft?",
        "De trein naar Amsterdam vertrekt over vijf minuten.",
        "Morgen gaan we met de fiets naar het strand.",
    ),
}
SPEECH_VOICES: tuple[tuple[str, str], ...] = (  # (eSpeak voice name, sentence language)
    ("en", "en"), ("en-us", "en"), ("en-gb-scotland", "en"), ("en-gb-x-rp", "en"),
    ("en-029", "en"), ("en-gb-x-gbclan", "en"), ("en-us-nyc", "en"), ("en-gb-x-gbcwmd", "en"),
    ("de", "de"), ("fr", "fr"), ("es", "es"), ("es-419", "es"), ("it", "it"), ("pt", "pt"),
    ("pt-br", "pt"), ("nl", "nl"),
)
SPEECH_VARIANTS: tuple[str, ...] = (
    "", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5",
    "klatt", "klatt2", "klatt3", "Andy", "Annie", "adam", "anika", "aunty", "boris", "david",
    "edward", "grandma", "grandpa", "john", "linda", "max", "michel", "paul", "robert", "steph",
)


# --------------------------------------------------------------------------------------------
# Event rendering
# --------------------------------------------------------------------------------------------

SCALES = {
    "major": (0, 2, 4, 5, 7, 9, 11),
    "minor": (0, 2, 3, 5, 7, 8, 10),
    "dorian": (0, 2, 3, 5, 7, 9, 10),
    "mixolydian": (0, 2, 4, 5, 7, 9, 10),
    "harmonic minor": (0, 2, 3, 5, 7, 8, 11),
    "major pentatonic": (0, 2, 4, 7, 9),
    "minor pentatonic": (0, 3, 5, 7, 10),
}
PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (5, 3, 0, 4), (0, 3, 0, 4), (1, 4, 0, 0))


@dataclass
class RenderedEvent:
    """One event's audio before placement: trimmed to where it is audible and normalised."""

    class_name: str
    audio: np.ndarray  # float32 (samples,)
    source: str  # what made it, e.g. "gm:program=40 style=melody" or "espeak:en-us+f3"
    level_dbfs: float


@dataclass
class RenderedClip:
    """A clip's mixture with its parts (for tests and inspection)."""

    clip_id: str
    audio: np.ndarray  # float32 (clip_samples,): background + events, peak <= 0.99
    background: np.ndarray  # float32 (clip_samples,), as mixed (after any peak scaling)
    events: list[dict]  # rows of EVENT_SCHEMA (without shard)
    event_audio: list[np.ndarray]  # each event's audio as mixed, placed at its onset sample
    labels: list[str]  # mids, in label-set order


def _scale_keys(rng: np.random.Generator, register: tuple[int, int]) -> tuple[list[int], list[int], int]:
    """A random key: (scale notes within register, the scale's pitch classes, tonic pc)."""
    tonic = int(rng.integers(12))
    mode = list(SCALES)[int(rng.integers(len(SCALES)))]
    pcs = [(tonic + s) % 12 for s in SCALES[mode]]
    keys = [k for k in range(register[0], register[1] + 1) if k % 12 in pcs]
    return keys, pcs, tonic


def _chord(degree: int, keys_pc: list[int], root_key: int) -> list[int]:
    """Triad on a scale degree (stacked thirds of the 7-note diatonic scale)."""
    n = len(keys_pc)
    pcs = [keys_pc[(degree + 2 * i) % n] for i in range(3)]
    out, k = [], root_key
    for pc in pcs:
        while k % 12 != pc:
            k += 1
        out.append(k)
    return out


def _melody_notes(rng, keys, start, end, beat, legato, vel_base, max_leap=4, phrase=(4, 10)) -> list[Note]:
    notes: list[Note] = []
    t = start
    idx = int(rng.integers(len(keys) // 4, max(len(keys) * 3 // 4, len(keys) // 4 + 1)))
    durations = np.array([0.25, 0.5, 0.5, 0.75, 1.0, 1.0, 1.5, 2.0])
    while t < end:
        for _ in range(int(rng.integers(phrase[0], phrase[1] + 1))):
            if t >= end:
                break
            d = float(durations[rng.integers(len(durations))]) * beat
            step = int(rng.choice([-2, -1, -1, 0, 1, 1, 2, rng.integers(-max_leap, max_leap + 1)]))
            idx = int(np.clip(idx + step, 0, len(keys) - 1))
            vel = int(np.clip(vel_base + rng.normal(0, 8), 30, 127))
            notes.append((t, min(t + d * legato, end), keys[idx], vel))
            t += d
        t += float(rng.uniform(0.5, 2.0)) * beat  # breath between phrases
    return notes


def _melodic_event(rng, recipe: SoundRecipe, seconds: float) -> tuple[list[Note], int, str]:
    program = int(rng.choice(recipe.programs))
    style = str(rng.choice(recipe.styles))
    bpm = float(rng.uniform(*recipe.tempo))
    beat = 60.0 / bpm
    vel = int(rng.integers(65, 115))
    lo, hi = recipe.register
    keys, pcs, tonic = _scale_keys(rng, (lo, hi))
    minor = 3 in [(p - tonic) % 12 for p in pcs]  # chords from the major or natural minor scale
    diatonic = [(tonic + s) % 12 for s in SCALES["minor" if minor else "major"]]
    prog = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    bar = 4 * beat
    end = seconds
    notes: list[Note] = []
    if style == "melody":
        legato = float(rng.uniform(0.8, 1.0)) if recipe.programs[0] not in (12, 13, 46) else 1.0
        notes = _melody_notes(rng, keys, 0.0, end, beat, legato, vel)
    elif style == "bass":
        t, i = 0.0, 0
        pattern = [(1.0,), (0.5, 0.5), (1.5, 0.5), (0.75, 0.25, 1.0)][int(rng.integers(4))]
        root_base = lo + int(rng.integers(0, 8))
        while t < end:
            chord = _chord(prog[i % len(prog)], diatonic, root_base)
            for b in range(4):
                for j, d in enumerate(pattern):
                    key = chord[0] + (12 if (j == 1 and rng.random() < 0.3) else 0)
                    if rng.random() < 0.2:
                        key = chord[int(rng.integers(3))]
                    v = int(np.clip(vel + rng.normal(0, 6), 40, 127))
                    notes.append((t, min(t + d * beat * 0.9, end), int(min(key, hi)), v))
                    t += d * beat
                    if t >= end:
                        break
                if t >= end:
                    break
            i += 1
    elif style in ("piano", "pad", "choir"):
        t, i = 0.0, 0
        mid = (lo + hi) // 2
        while t < end:
            chord = _chord(prog[i % len(prog)], diatonic, max(lo, mid - 12 + int(rng.integers(0, 5))))
            if style == "piano":  # left-hand chord (block or broken), right-hand melody on top
                if rng.random() < 0.5:
                    notes += [(t, min(t + bar * 0.95, end), k, vel - 15) for k in chord]
                else:
                    for b, k in enumerate(chord + [chord[1]]):
                        notes.append((t + b * beat, min(t + b * beat + beat, end), k, vel - 15))
            else:  # sustained chord: one per bar (choir: two bars)
                voicing = chord + ([chord[0] + 12] if rng.random() < 0.5 else [])
                length = bar * (2 if style == "choir" else 1)
                notes += [(t, min(t + length * 0.98, end), k, vel) for k in voicing]
            t += bar * (2 if style == "choir" else 1)
            i += 1
        if style != "choir":
            upper = [k for k in keys if k >= mid] or keys
            notes += _melody_notes(rng, upper, 0.0, end, beat, 0.95, vel)
    elif style in ("strum", "power"):
        t, i = 0.0, 0
        patterns = [(1.0, 1.0, 1.0, 1.0), (1.5, 1.5, 1.0), (0.5, 1.0, 0.5, 1.0, 1.0), (2.0, 2.0)]
        strum_pattern = patterns[int(rng.integers(len(patterns)))]
        while t < end:
            base = lo + int(rng.integers(0, 8))
            chord = _chord(prog[i % len(prog)], diatonic, base)
            if style == "power":
                shape = [chord[0], chord[0] + 7, chord[0] + 12]
            else:
                shape = chord + [chord[0] + 12, chord[1] + 12]
            for j, d in enumerate(strum_pattern):
                down = j % 2 == 0
                order = shape if down else shape[::-1]
                gap = float(rng.uniform(0.008, 0.03))
                v = vel + (8 if down else -8)
                for n, k in enumerate(order):
                    notes.append((t + n * gap, min(t + d * beat * 0.95, end), k, v))
                t += d * beat
                if t >= end:
                    break
            i += 1
    else:  # arpeggio
        t, i = 0.0, 0
        step = beat / float(rng.choice([2, 3, 4]))
        span = int(rng.integers(2, 4))
        while t < end:
            chord = _chord(prog[i % len(prog)], diatonic, max(lo, (lo + hi) // 2 - 12))
            up = [k + 12 * o for o in range(span) for k in chord if k + 12 * o <= hi]
            seq = up + up[-2:0:-1] if rng.random() < 0.5 else up
            for k in seq:
                notes.append((t, min(t + step * 3, end), k, int(np.clip(vel + rng.normal(0, 6), 30, 127))))
                t += step
                if t >= end:
                    break
            i += 1
    return notes, program, f"gm:program={program} style={style} bpm={bpm:.0f}"


def _drum_event(rng, recipe: SoundRecipe, seconds: float) -> tuple[list[Note], int, str]:
    kit = int(rng.choice(recipe.programs))
    bpm = float(rng.uniform(*recipe.tempo))
    sixteenth = 60.0 / bpm / 4
    vel = int(rng.integers(75, 120))
    style = str(rng.choice(["rock", "funk", "shuffle", "halftime"]))
    kick = {"rock": (0, 8), "funk": (0, 3, 10), "shuffle": (0, 8), "halftime": (0, 11)}[style]
    snare = {"rock": (4, 12), "funk": (4, 12), "shuffle": (4, 12), "halftime": (8,)}[style]
    hat_key = 51 if style == "shuffle" else int(rng.choice([42, 42, 46]))
    hat_steps = {
        "rock": range(0, 16, 2), "funk": range(16), "shuffle": (0, 3, 4, 7, 8, 11, 12, 15), "halftime": range(0, 16, 2)
    }[style]
    fill_every = int(rng.choice([2, 4]))
    notes: list[Note] = [(0.0, 0.5, 49, vel)]  # crash on the downbeat
    step, bar = 0, 0
    while step * sixteenth < seconds:
        t0 = step * sixteenth
        s = step % 16
        last_bar_of_phrase = (bar % fill_every) == fill_every - 1
        if last_bar_of_phrase and s >= 12:  # a fill on toms/snare
            k = int(rng.choice([38, 50, 48, 47, 45, 43]))
            notes.append((t0, t0 + sixteenth, k, int(np.clip(vel + rng.normal(0, 8), 40, 127))))
        else:
            if s in kick or (style == "funk" and rng.random() < 0.1):
                notes.append((t0, t0 + sixteenth, 36, vel))
            if s in snare:
                notes.append((t0, t0 + sixteenth, 38, vel))
            elif style in ("funk", "shuffle") and rng.random() < 0.12:
                notes.append((t0, t0 + sixteenth, 38, max(vel - 50, 25)))  # ghost note
            if s in hat_steps:
                accent = 10 if s % 4 == 0 else -10
                notes.append((t0, t0 + sixteenth, hat_key, int(np.clip(vel - 20 + accent, 25, 127))))
        step += 1
        if step % 16 == 0:
            bar += 1
            if bar % fill_every == 0:
                notes.append((step * sixteenth, step * sixteenth + 0.5, 49, vel))
    return notes, kit, f"gm:drumkit={kit} style={style} bpm={bpm:.0f}"


def _effect_event(rng, recipe: SoundRecipe, seconds: float) -> tuple[list[Note], float, np.ndarray | None, str]:
    """Notes of a GM sound effect; returns (notes, pre-roll seconds, gain envelope or None, source)."""
    kind = recipe.kind
    notes: list[Note] = []
    pre = 0.0
    vel = int(rng.integers(90, 127))
    if kind == "bird":
        t = 0.0
        while t < seconds:
            motif = [int(k) for k in rng.integers(60, 88, size=int(rng.integers(1, 4)))]
            gap = float(rng.uniform(0.05, 0.2))
            for n in range(int(rng.integers(3, 12))):
                k = motif[n % len(motif)] + int(rng.integers(-1, 2))
                notes.append((t, t + float(rng.uniform(0.05, 0.15)), k, int(np.clip(vel + rng.normal(0, 10), 50, 127))))
                t += gap * float(rng.uniform(0.8, 1.25))
                if t >= seconds:
                    break
            t += float(rng.uniform(0.25, 1.2))
        source = "bird song"
    elif kind == "telephone":
        key = int(rng.integers(58, 74))
        ring = float(rng.uniform(0.8, 2.0))
        pause = float(rng.uniform(0.6, 2.5))
        period = float(rng.uniform(0.08, 0.15))
        t = 0.0
        while t < seconds:
            r = t
            while r < min(t + ring, seconds):
                notes.append((r, r + period, key, vel))
                r += period
            t += ring + pause
        source = f"ring {ring:.1f}s/pause {pause:.1f}s"
    elif kind == "gunshot":
        t = 0.0
        automatic = rng.random() < 0.35
        while t < seconds:
            if automatic:
                interval = float(rng.uniform(0.07, 0.14))
                for _ in range(int(rng.integers(3, 10))):
                    notes.append((t, t + 0.3, int(rng.integers(55, 67)), int(np.clip(vel + rng.normal(0, 8), 60, 127))))
                    t += interval
                t += float(rng.uniform(0.2, 0.8))
            else:
                notes.append((t, t + 0.4, int(rng.integers(50, 68)), vel))
                t += float(rng.uniform(0.25, 1.0))
        source = "automatic fire" if automatic else "single shots"
    elif kind == "waves":
        pre = 1.0
        t = 0.0
        while t < pre + seconds:
            notes.append((t, t + float(rng.uniform(4.0, 8.0)), int(rng.integers(56, 68)), vel))
            t += float(rng.uniform(2.5, 5.5))
        source = "seashore"
    else:  # helicopter, applause: held notes (looped samples) after a pre-roll past their attack
        pre = 2.5 if kind == "helicopter" else 1.0
        key = int(rng.integers(52, 70))
        notes.append((0.0, pre + seconds + 1.0, key, vel))
        if kind == "applause":  # denser crowd: a second layer at another pitch
            notes.append((float(rng.uniform(0, 0.3)), pre + seconds + 1.0, key + int(rng.integers(3, 9)), vel))
        source = f"key {key}"
    # slow loudness movement: fly-by for the helicopter, swells for the surf, dying applause
    envelope = None
    n = int(round((pre + seconds) * 1000))
    t_ms = np.arange(n) / 1000.0
    if kind in ("helicopter", "waves"):
        period = float(rng.uniform(4.0, 12.0))
        depth = float(rng.uniform(3.0, 8.0))
        envelope = 10 ** (depth * np.sin(2 * np.pi * t_ms / period + rng.uniform(0, 2 * np.pi)) / 20)
    elif kind == "applause":
        tail = float(rng.uniform(0.5, 1.5))
        envelope = np.clip((pre + seconds - t_ms) / tail, 0.1, 1.0)
    return notes, pre, envelope, source


def _frame_db(x: np.ndarray, frame: int) -> np.ndarray:
    n = len(x) // frame
    if n == 0:
        return np.full(1, -200.0)
    power = (x[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1)
    return 10 * np.log10(power + 1e-20)


def trim_to_audible(x: np.ndarray, sample_rate: int, floor_db: float = 45.0) -> np.ndarray:
    """Cut leading/trailing parts more than ``floor_db`` below the loudest 10-ms frame."""
    frame = max(sample_rate // 100, 1)
    db = _frame_db(x, frame)
    loud = np.nonzero(db > db.max() - floor_db)[0]
    if len(loud) == 0 or db.max() < -100:
        return x[:0]
    return x[loud[0] * frame : min((loud[-1] + 1) * frame, len(x))]


def gated_rms_db(x: np.ndarray, sample_rate: int, gate_db: float = 20.0) -> float:
    """RMS level (dBFS) over the 50-ms frames within ``gate_db`` of the loudest one."""
    db = _frame_db(x, max(sample_rate // 20, 1))
    active = db[db > db.max() - gate_db]
    return float(10 * np.log10(np.mean(10 ** (active / 10)) + 1e-20))


def _fade(x: np.ndarray, sample_rate: int, fade_in: float, fade_out: float) -> np.ndarray:
    x = x.astype(np.float32, copy=True)
    n_in = min(int(fade_in * sample_rate), len(x) // 2)
    n_out = min(int(fade_out * sample_rate), len(x) // 2)
    if n_in > 0:
        x[:n_in] *= (0.5 - 0.5 * np.cos(np.pi * np.arange(n_in) / n_in)).astype(np.float32)
    if n_out > 0:
        x[len(x) - n_out :] *= (0.5 + 0.5 * np.cos(np.pi * np.arange(1, n_out + 1) / n_out)).astype(np.float32)
    return x


def _speech_event(rng, seconds: float, sample_rate: int) -> tuple[np.ndarray, str]:
    import soxr

    engine = _espeak()
    voice, lang = SPEECH_VOICES[int(rng.integers(len(SPEECH_VOICES)))]
    variant = SPEECH_VARIANTS[int(rng.integers(len(SPEECH_VARIANTS)))]
    name = f"{voice}+{variant}" if variant else voice
    rate = int(rng.integers(130, 230))
    pitch = int(rng.integers(20, 80))
    pitch_range = int(rng.integers(30, 90))
    sentences = SENTENCES[lang]
    order = rng.permutation(len(sentences))
    pieces, total = [], 0.0
    for j in order:  # whole sentences until the event is long enough
        pcm = engine.synthesize(sentences[int(j)], name, rate, pitch, pitch_range)
        x = trim_to_audible(pcm.astype(np.float32) / 32768.0, engine.sample_rate)
        pieces.append(x)
        pieces.append(np.zeros(int(rng.uniform(0.15, 0.5) * engine.sample_rate), np.float32))
        total += (len(x) + len(pieces[-1])) / engine.sample_rate
        if total >= seconds:
            break
    audio = np.concatenate(pieces[:-1])
    audio = soxr.resample(audio, engine.sample_rate, sample_rate, quality="HQ").astype(np.float32)
    limit = int(seconds * sample_rate)
    if len(audio) > limit:  # cut at the quietest 20 ms in the last 20 % (a pause if there is one)
        frame = sample_rate // 50
        lo = int(0.8 * limit) // frame
        db = _frame_db(audio[: limit // frame * frame], frame)
        cut = (lo + int(np.argmin(db[lo:]))) * frame if len(db) > lo else limit
        audio = audio[: max(cut, frame)]
    return audio, f"espeak:{name} rate={rate} pitch={pitch}"


def event_seconds_range(recipe: SoundRecipe, config: DemoCorpusConfig) -> tuple[float, float]:
    """The class's natural length range intersected with the config's (config's if disjoint)."""
    lo, hi = config.min_event_seconds, config.max_event_seconds
    if recipe.seconds is not None:
        nlo, nhi = max(lo, recipe.seconds[0]), min(hi, recipe.seconds[1])
        if nlo <= nhi:
            return nlo, nhi
    return lo, hi


def render_event(
    class_name: str, rng: np.random.Generator, seconds: float, sample_rate: int, level_dbfs: float
) -> RenderedEvent:
    """One event of ``class_name`` lasting at most ``seconds``: trimmed, faded, normalised.

    ``level_dbfs``: target gated RMS (:func:`gated_rms_db`); the peak is kept <= 0.9.
    """
    recipe = SOUND_RECIPES[class_name]
    sr = sample_rate
    if recipe.kind == "speech":
        audio, source = _speech_event(rng, seconds, sr)
    else:
        body = seconds - 0.05  # notes stop a little early; the release rings until `seconds`
        envelope = None
        pre = 0.0
        if recipe.kind == "melodic":
            notes, program, source = _melodic_event(rng, recipe, body)
            audio = render_notes(notes, program, seconds, sr)
        elif recipe.kind == "drums":
            notes, program, source = _drum_event(rng, recipe, body)
            audio = render_notes(notes, program, seconds, sr, drums=True)
        else:
            program = recipe.programs[0]
            notes, pre, envelope, detail = _effect_event(rng, recipe, body)
            source = f"gm:program={program} {detail}"
            audio = render_notes(notes, program, pre + seconds, sr)
        if envelope is not None:
            env = np.interp(np.arange(len(audio)) / sr, np.arange(len(envelope)) / 1000.0, envelope)
            audio = (audio * env).astype(np.float32)
        audio = audio[int(round(pre * sr)) :]
    audio = trim_to_audible(audio, sr)
    if len(audio) < sr // 20:
        raise RuntimeError(f"{class_name}: rendered no audible sound ({source})")
    audio = _fade(audio, sr, fade_in=0.01, fade_out=0.05)
    gain = 10 ** ((level_dbfs - gated_rms_db(audio, sr)) / 20)
    peak = float(np.abs(audio).max()) * gain
    if peak > 0.9:
        gain *= 0.9 / peak
    audio = (audio * gain).astype(np.float32)
    return RenderedEvent(class_name, audio, source, gated_rms_db(audio, sr))


def background_noise(
    rng: np.random.Generator, num_samples: int, sample_rate: int, level_dbfs: float
) -> tuple[np.ndarray, str]:
    """Pink-to-brown noise (1/f^alpha, alpha in [1, 2], no content below 20 Hz) at an RMS level."""
    alpha = float(rng.uniform(1.0, 2.0))
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, 1.0 / sample_rate)
    shape = np.zeros_like(freqs)
    keep = freqs >= 20.0
    shape[keep] = freqs[keep] ** (-alpha / 2)
    x = np.fft.irfft(spectrum * shape, n=num_samples)
    x *= 10 ** (level_dbfs / 20) / (np.sqrt(np.mean(x**2)) + 1e-20)
    return x.astype(np.float32), f"1/f^{alpha:.2f} noise"


def clip_id_for(config: DemoCorpusConfig, index: int) -> str:
    """``demo-s{seed}-{index:06d}``: names the seed and index that render it (no dots)."""
    return f"demo-s{config.seed}-{index:06d}"


def render_clip(config: DemoCorpusConfig, classes: list[DemoClass], index: int) -> RenderedClip:
    """Clip ``index`` of the corpus, from ``SeedSequence([seed, index])`` alone."""
    sr, n = config.sample_rate, config.clip_samples
    root = np.random.SeedSequence([config.seed, index])
    plan_seq, bg_seq, *event_seqs = root.spawn(2 + config.max_events)
    rng = np.random.default_rng(plan_seq)
    k = int(rng.integers(config.min_events, config.max_events + 1))
    chosen = sorted(int(c) for c in rng.choice(len(classes), size=k, replace=False))
    clip_id = clip_id_for(config, index)
    bg_level = float(rng.uniform(*config.background_level_dbfs))
    background, _ = background_noise(np.random.default_rng(bg_seq), n, sr, bg_level)
    mix = background.astype(np.float64)
    placed, events = [], []
    for j, c in enumerate(chosen):
        cls = classes[c]
        recipe = SOUND_RECIPES[cls.display_name]
        erng = np.random.default_rng(event_seqs[j])
        lo, hi = event_seconds_range(recipe, config)
        seconds = float(erng.uniform(lo, hi))
        level = float(erng.uniform(*config.event_level_dbfs))
        ev = render_event(cls.display_name, erng, seconds, sr, level)
        audio = ev.audio[:n]
        onset = int(erng.integers(0, n - len(audio) + 1))
        full = np.zeros(n, np.float32)
        full[onset : onset + len(audio)] = audio
        mix += full
        placed.append(full)
        events.append({
            "clip_id": clip_id,
            "event_index": j,
            "class_index": cls.index,
            "mid": cls.mid,
            "display_name": cls.display_name,
            "onset_seconds": onset / sr,
            "offset_seconds": (onset + len(audio)) / sr,
            "level_dbfs": ev.level_dbfs,
            "source": ev.source,
        })
    peak = float(np.abs(mix).max())
    scale = 0.99 / peak if peak > 0.99 else 1.0
    if scale != 1.0:
        placed = [p * np.float32(scale) for p in placed]
        background = background * np.float32(scale)
    return RenderedClip(
        clip_id=clip_id,
        audio=(mix * scale).astype(np.float32),
        background=background,
        events=events,
        event_audio=placed,
        labels=[classes[c].mid for c in chosen],
    )


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """16-bit FLAC bytes of mono float audio (rounded, not dithered: deterministic)."""
    import soundfile

    pcm = np.clip(np.round(audio.astype(np.float64) * 32767.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    soundfile.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _render_chunk(
    config_dict: dict, classes: list[DemoClass], indexes: list[int]
) -> list[tuple[str, bytes, bytes, list[dict]]]:
    """Worker task: [(clip_id, flac bytes, json bytes, event rows)] for clip ``indexes``."""
    config = DemoCorpusConfig(**config_dict)
    out = []
    for i in indexes:
        clip = render_clip(config, classes, i)
        meta = {"clip_id": clip.clip_id, "labels": clip.labels, "sample_rate": config.sample_rate}
        flac = encode_flac(clip.audio, config.sample_rate)
        out.append((clip.clip_id, flac, json.dumps(meta, sort_keys=True).encode(), clip.events))
    return out


# --------------------------------------------------------------------------------------------
# Writing the corpus
# --------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        temp.write_bytes(data)


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _events_table(rows: list[dict]):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=EVENT_SCHEMA)


def _event_schema():
    import pyarrow as pa

    return pa.schema([
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("event_index", pa.int32(), nullable=False),
        pa.field("class_index", pa.int32(), nullable=False),
        pa.field("mid", pa.string(), nullable=False),
        pa.field("display_name", pa.string(), nullable=False),
        pa.field("onset_seconds", pa.float64(), nullable=False),
        pa.field("offset_seconds", pa.float64(), nullable=False),
        pa.field("level_dbfs", pa.float32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ])


EVENT_SCHEMA = _event_schema()
"""events.parquet, one row per event (strong labels; for evaluation only, never for training):

clip_id (the shard's sample key), shard (its tar file's stem, e.g. ``demo-00000``),
event_index (order of rendering in the clip), class_index (row in labels.csv), mid and
display_name (AudioSet), onset_seconds / offset_seconds (where the event is audible: it is
silent outside, the background aside), level_dbfs (gated RMS, :func:`gated_rms_db`), source
(what made it: GM program and style, or eSpeak voice). Rows are sorted by clip, then onset."""


def _versions() -> dict[str, str]:
    import soundfile

    out = {"python": sys.version.split()[0], "libsndfile": soundfile.__libsndfile_version__}
    for dist in ("numpy", "soundfile", "soxr", "tinysoundfont", "espeakng-loader", "pretty_midi", "pyarrow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


LICENSES = {
    "TimGM6mb.sf2": "GPL-2.0 (Tim Brechbill's TimGM6mb soundfont, as shipped in the pretty_midi package)",
    "eSpeak NG": "GPL-3.0-or-later (espeak-ng library and voice data, as shipped in espeakng-loader)",
    "tinysoundfont": "MIT (the renderer; adds no sound of its own)",
    "sentences": "written for this corpus, public domain",
    "AudioSet labels": "class ids and names from AudioSet's ontology (Google, CC BY-SA 4.0)",
}


def _readme(config: DemoCorpusConfig, classes: list[DemoClass], summary: dict) -> str:
    lines = [
        "USS demo corpus (a mini-AudioSet built from pip-installable sounds)",
        "",
        f"{summary['num_clips']} clips of {config.clip_seconds:g} s, {config.sample_rate} Hz mono 16-bit FLAC, "
        f"in {summary['num_shards']} WebDataset shards (shards/demo-NNNNN.tar: <clip_id>.flac + <clip_id>.json).",
        f"Seed {config.seed}: rebuilding with the same seed and package versions gives byte-identical shards.",
        f"Each clip: {config.min_events}-{config.max_events} events of distinct classes, "
        f"{config.min_event_seconds:g}-{config.max_event_seconds:g} s each (natural ranges for some effects), "
        f"at random onsets, each normalised to {config.event_level_dbfs[0]:g}..{config.event_level_dbfs[1]:g} dBFS "
        "(gated RMS), over pink/brown noise at "
        f"{config.background_level_dbfs[0]:g}..{config.background_level_dbfs[1]:g} dBFS.",
        "The shards hold clip-level (weak) labels only; events.parquet holds the true event times",
        "(clip_id, shard, mid, display_name, onset_seconds, offset_seconds, ...) for evaluation only.",
        "labels.csv is the label set (AudioSet class_labels_indices.csv format, demo indexes).",
        "",
        f"Classes ({len(classes)}): clips per class",
    ]
    counts = summary["clips_per_class"]
    lines += [f"  {c.index:2d} {c.mid:<12} {c.display_name}: {counts.get(c.display_name, 0)}" for c in classes]
    lines += [
        "",
        "Sources and licenses:",
        "  Instruments, drum kits and sound effects: General MIDI soundfont TimGM6mb.sf2 (GPL-2.0,",
        "  shipped in the pretty_midi package), rendered with tinysoundfont (MIT).",
        "  Speech: eSpeak NG (GPL-3.0-or-later, shipped in espeakng-loader), sentences written for",
        "  this corpus (public domain). Label ids and names: AudioSet ontology (Google, CC BY-SA 4.0).",
        "  Audio rendered from GPL sound data: redistribute the corpus under terms compatible with",
        "  those licenses.",
        "",
    ]
    return "\n".join(lines)


class _Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.bar, self.enabled = total, 0, None, enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="clip", desc="demo corpus", file=sys.stderr)
            except ImportError:
                pass

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"\rdemo corpus: {self.done}/{self.total} clips", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def build_demo_corpus(
    config: DemoCorpusConfig | None = None,
    out_dir: str | os.PathLike = "demo_corpus",
    metadata_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int | None = None,
) -> DemoCorpusSummary:
    """Render the demo corpus into ``out_dir`` (see the module docstring for the layout).

    ``num_workers``: rendering processes (default: the CPUs this process may use, at most 8;
    1 renders in this process). Shards are written as soon as their clips are rendered, each
    atomically; ``corpus.json`` is written last, so its presence marks a complete build.
    Stale ``demo-*.tar`` shards of an earlier build in ``out_dir/shards`` are removed. Workers
    are spawned (not forked), so a script calling this needs the usual ``__main__`` guard.
    """
    config = config or DemoCorpusConfig()
    config.validate()
    start = time.perf_counter()
    classes = resolve_demo_classes(config.classes, metadata_dir)
    label_source = find_metadata_dir(metadata_dir)
    if label_source is None:
        print(
            f"demo corpus: no AudioSet metadata found ({ontology.FETCH_HINT}); using the built-in AudioSet ids",
            file=sys.stderr,
        )
    soundfont_path()
    _tinysoundfont()
    out = Path(out_dir)
    shard_dir = out / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    (out / "corpus.json").unlink(missing_ok=True)

    if num_workers is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        num_workers = max(1, min(cpus, 8))
    num_workers = max(1, min(num_workers, config.num_clips))
    chunk = max(1, min(8, math.ceil(config.num_clips / (4 * num_workers))))
    chunks = [list(range(i, min(i + chunk, config.num_clips))) for i in range(0, config.num_clips, chunk)]
    config_dict = dataclasses.asdict(config)

    pending: dict[int, tuple[str, bytes, bytes, list[dict]]] = {}
    shard_paths: list[Path] = []
    event_rows: list[dict] = []
    clips_per_class: dict[str, int] = {c.display_name: 0 for c in classes}
    next_shard = 0

    def flush_ready() -> None:
        nonlocal next_shard
        while next_shard < config.num_shards:
            lo = next_shard * config.clips_per_shard
            hi = min(lo + config.clips_per_shard, config.num_clips)
            if any(i not in pending for i in range(lo, hi)):
                return
            shard_name = SHARD_PATTERN.format(shard=next_shard)
            members = []
            for i in range(lo, hi):
                clip_id, flac, meta, events = pending.pop(i)
                members += [(f"{clip_id}.flac", flac), (f"{clip_id}.json", meta)]
                for e in events:
                    event_rows.append({**e, "shard": shard_name[: -len(".tar")]})
                for name in {e["display_name"] for e in events}:
                    clips_per_class[name] += 1
            path = shard_dir / shard_name
            _write_atomic(path, _tar_bytes(members))
            shard_paths.append(path)
            next_shard += 1

    bar = _Progress(config.num_clips, progress)
    try:
        if num_workers == 1:
            for idx in chunks:
                for i, item in zip(idx, _render_chunk(config_dict, classes, idx)):
                    pending[i] = item
                bar.update(len(idx))
                flush_ready()
        else:
            ctx = multiprocessing.get_context("spawn")  # no inherited threads or Ray state
            with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
                results = pool.map(_render_chunk, [config_dict] * len(chunks), [classes] * len(chunks), chunks)
                for idx, result in zip(chunks, results):
                    for i, item in zip(idx, result):
                        pending[i] = item
                    bar.update(len(idx))
                    flush_ready()
    finally:
        bar.close()
    flush_ready()

    keep = {p.name for p in shard_paths}
    for stale in shard_dir.glob("demo-*.tar"):
        if stale.name not in keep:
            stale.unlink()

    import pyarrow.parquet as pq

    events_path = out / "events.parquet"
    event_rows.sort(key=lambda e: (e["clip_id"], e["onset_seconds"], e["event_index"]))
    table = _events_table(event_rows)
    with atomic_path(events_path) as temp:
        pq.write_table(table, temp)
    label_set = ontology.LabelSet(tuple(c.mid for c in classes), tuple(c.display_name for c in classes))
    labels_path = label_set.to_csv(out / "labels.csv")

    counts = {
        "num_clips": config.num_clips,
        "num_shards": len(shard_paths),
        "num_events": len(event_rows),
        "audio_seconds": config.num_clips * config.clip_seconds,
        "clips_per_class": clips_per_class,
    }
    readme_path = out / "README.txt"
    _write_atomic(readme_path, _readme(config, classes, counts).encode())
    corpus = {
        "name": CORPUS_NAME,
        "version": CORPUS_VERSION,
        "config": config_dict,
        **counts,
        "label_source": ontology.LABELS_FILENAME if label_source else "built-in AudioSet ids",
        "classes": [
            {**dataclasses.asdict(c), "ancestors": list(c.ancestors), "recipe": SOUND_RECIPES[c.display_name].kind}
            for c in classes
        ],
        "files": {
            "shards": [str(p.relative_to(out)) for p in shard_paths],
            "events": events_path.name,
            "labels": labels_path.name,
            "readme": readme_path.name,
        },
        "shard_format": (
            "WebDataset tar: <clip_id>.flac (16-bit FLAC) + <clip_id>.json {clip_id, labels: [mid], sample_rate}"
        ),
        "licenses": LICENSES,
        "versions": _versions(),
    }
    corpus_path = out / "corpus.json"
    _write_atomic(corpus_path, (json.dumps(corpus, indent=2, sort_keys=False) + "\n").encode())
    return DemoCorpusSummary(
        out_dir=out,
        num_clips=config.num_clips,
        num_shards=len(shard_paths),
        num_events=len(event_rows),
        num_classes=len(classes),
        shard_paths=shard_paths,
        events_path=events_path,
        labels_path=labels_path,
        corpus_json_path=corpus_path,
        readme_path=readme_path,
        audio_seconds=counts["audio_seconds"],
        seconds=time.perf_counter() - start,
        clips_per_class=clips_per_class,
    )


# --------------------------------------------------------------------------------------------
# True sources: the evaluation set with each target's clean class stem
# --------------------------------------------------------------------------------------------

# A pair is kept when its true source holds at least this share of the target anchor's energy
# (-20 dB): below it the anchor is a mining miss (the class is absent or only a fade-out tail),
# its true target is (nearly) silence and SDR says nothing about separation.
MIN_TRUE_SOURCE_SHARE = 0.01


@dataclass
class TrueSourceSummary:
    """What :func:`write_true_source_evaluation_set` wrote."""

    out_path: Path
    num_pairs: int  # pairs written
    num_dropped: int  # pairs whose anchor misses its class (true source under the share)
    num_clips: int  # clips re-rendered
    mean_true_share: float  # mean share of the target anchor's energy that is the true source

    def __str__(self) -> str:
        return (f"true-source evaluation set: {self.num_pairs} pairs in {self.out_path} ({self.num_dropped} "
                f"dropped: anchor misses its class; {self.num_clips} clips re-rendered; the true source is "
                f"{100 * self.mean_true_share:.0f}% of a target anchor's energy on average)")


def load_corpus_description(corpus_dir: str | os.PathLike) -> tuple[DemoCorpusConfig, list[DemoClass]]:
    """The config and classes a finished corpus in ``corpus_dir`` was rendered with (its
    ``corpus.json``), so that any clip of it can be rendered again."""
    path = Path(corpus_dir) / "corpus.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: {corpus_dir} is not a finished demo corpus (run `uss corpus demo`)")
    document = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(DemoCorpusConfig)}
    config = DemoCorpusConfig(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in document["config"].items() if k in fields
    })
    classes = [
        DemoClass(c["index"], c["mid"], c["display_name"], c["audioset_index"], tuple(c["ancestors"]))
        for c in document["classes"]
    ]
    return config, classes


def clip_index_for(config: DemoCorpusConfig, clip_id: str) -> int:
    """The index of the clip named ``clip_id`` (as :func:`clip_id_for` names it; a dataset's
    ``"<shard>/<clip_id>"`` form too); ConfigError if the name is not of this corpus."""
    name = clip_id.rsplit("/", 1)[-1]
    prefix = f"demo-s{config.seed}-"
    digits = name[len(prefix):]
    if not name.startswith(prefix) or not digits.isdigit() or int(digits) >= config.num_clips:
        raise ConfigError(f"clip {clip_id!r} is not a clip of this demo corpus (seed {config.seed}, "
                          f"{config.num_clips} clips): were the anchors mined from another corpus?")
    return int(digits)


def write_true_source_evaluation_set(
    corpus_dir: str | os.PathLike,
    eval_uri: str,
    anchors_uri: str,
    out_dir: str | os.PathLike,
    filesystem: object = None,
) -> TrueSourceSummary:
    """A copy of the evaluation set at ``eval_uri`` whose targets are the true sources.

    The mixing stage's evaluation pairs take a weakly labelled anchor as the target, as the
    paper does on AudioSet: whatever else sounds in those 2 s counts as part of the target. The
    demo corpus knows better: each target anchor's clip (named in the anchors dataset at
    ``anchors_uri``) is rendered again from the corpus seed, the events of the target class are
    summed, cut to the anchor's samples and scaled by the pair's ``target_gain``. Mixtures,
    conditions and gains are unchanged, so the two sets score the same estimates against two
    targets. Pairs whose true source holds under :data:`MIN_TRUE_SOURCE_SHARE` of the anchor's
    energy are dropped (counted). Every re-rendered anchor is checked against the set's target
    (the decoded shard audio): a corpus rendered by other package versions is a ConfigError, not
    a wrong score. Writes ``out_dir/part-00000.parquet`` (``MIXTURE_SCHEMA``) atomically.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.schemas import MIXTURE_SCHEMA, float_list_array, read_table

    config, classes = load_corpus_description(corpus_dir)
    pairs = read_table(eval_uri, filesystem, schema=MIXTURE_SCHEMA)
    if pairs.num_rows == 0:
        raise ConfigError(f"no evaluation pairs in {eval_uri} (run `python -m jobs.mix --eval-out ...` first)")
    wanted = set(pairs.column("target_anchor_id").to_pylist())
    columns = ["anchor_id", "clip_id", "class_index", "start_sample", "end_sample"]
    anchors = {a["anchor_id"]: a for a in read_table(anchors_uri, filesystem, columns=columns).to_pylist()
               if a["anchor_id"] in wanted}
    missing = sorted(wanted - set(anchors))
    if missing:
        raise ConfigError(f"{len(missing)} target anchors of {eval_uri} are not in {anchors_uri} "
                          f"(e.g. {missing[0]}): pass the anchors the evaluation set was mixed from")

    rendered: dict[int, RenderedClip] = {}
    keep, targets, shares = [], [], []
    for row, (anchor_id, gain, target) in enumerate(zip(
        pairs.column("target_anchor_id").to_pylist(),
        pairs.column("target_gain").to_pylist(),
        pairs.column("target").to_numpy(zero_copy_only=False),
    )):
        anchor = anchors[anchor_id]
        index = clip_index_for(config, anchor["clip_id"])
        if index not in rendered:
            rendered[index] = render_clip(config, classes, index)
        clip = rendered[index]
        start, end = anchor["start_sample"], anchor["end_sample"]
        target = np.asarray(target, np.float32)
        again = clip.audio[start:end] * np.float32(gain)
        # 16-bit FLAC in the shards: 3e-5 of full scale, well inside the tolerance.
        if len(again) > len(target) or np.abs(again - target[: len(again)]).max() > 1e-3 * max(1.0, gain):
            raise ConfigError(
                f"clip {anchor['clip_id']} renders differently from its shard audio: the corpus in "
                f"{corpus_dir} was built with other package versions (see its corpus.json 'versions'); "
                "rebuild it here with `uss corpus demo`"
            )
        source = np.zeros_like(target)
        for audio, event in zip(clip.event_audio, clip.events):
            if event["class_index"] == anchor["class_index"]:
                source[: len(again)] += audio[start:end] * np.float32(gain)
        share = float(np.sum(source.astype(np.float64) ** 2) / max(np.sum(target.astype(np.float64) ** 2), 1e-20))
        if share >= MIN_TRUE_SOURCE_SHARE:
            keep.append(row)
            targets.append(source)
            shares.append(share)

    table = pairs.take(pa.array(keep, pa.int64()))
    table = table.set_column(table.schema.get_field_index("target"), "target", float_list_array(targets))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.parquet"):
        stale.unlink()
    out_path = out / "part-00000.parquet"
    with atomic_path(out_path) as temp:
        pq.write_table(table.cast(MIXTURE_SCHEMA), temp)
    return TrueSourceSummary(out_path, len(keep), pairs.num_rows - len(keep), len(rendered),
                             float(np.mean(shares)) if shares else float("nan"))
