"""The ``uss`` command: dispatches ``uss <command> ...`` to the job modules.

Each job module has ``main(argv) -> int``; user errors (:class:`uss_core.errors.UssError`) are
printed without a traceback and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

from uss_core.errors import UssError

COMMANDS = {
    "separate": ("jobs.separate_files", "separate audio files on this machine"),
    "metadata": ("jobs.metadata", "download the AudioSet ontology and label list"),
    "corpus": ("jobs.corpus", "build the embedded demo corpus"),
    "ingest": ("jobs.ingest", "decode AudioSet-style sources into the clips dataset"),
    "train-tagger": ("jobs.train_tagger", "train a Cnn14 tagger / sound event detector on weak labels"),
    "mine": ("jobs.mine", "mine 2-s anchors of every labelled class with the sound event detector"),
    "anchor-accuracy": ("jobs.anchor_accuracy", "score mined anchors against the demo corpus's true events"),
    "mix": ("jobs.mix", "mix anchors into training mixtures and an evaluation set"),
    "train": ("jobs.train", "train the separator on the mixtures with Ray Train, registered in MLflow"),
    "evaluate": ("jobs.evaluate", "SDRi / SI-SDRi per class of a separator on an evaluation set"),
    "bulk-separate": ("jobs.separate", "separate a whole archive (folder, s3:// prefix or URI list) on Ray"),
    "ablate": ("jobs.ablate", "the paper's ablation axes on the demo data, as one comparison table"),
    "demo": ("jobs.demo", "the whole system end to end on the embedded demo corpus"),
}


def _usage() -> str:
    lines = ["usage: uss <command> [options]", "", "commands:"]
    lines += [f"  {name:<16} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run 'uss <command> --help' for a command's options."]
    return "\n".join(lines)


def run_main(main, argv) -> int:
    """Run a job's ``main(argv)``, turning user errors into a message and exit status 2."""
    try:
        return int(main(argv) or 0)
    except UssError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return run_main(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
