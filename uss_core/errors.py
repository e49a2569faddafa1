"""One exception hierarchy for everything a user can get wrong.

Every error a user can fix (bad input file, unknown label, unreadable checkpoint, bad config)
is a :class:`UssError`; its message says what is wrong and what to do next. The command-line
entry points print these without a traceback and exit with status 2. Anything else is a bug.
"""


class UssError(Exception):
    """Base class of all user-facing errors."""


class AudioError(UssError):
    """An audio file cannot be read, is empty, or holds unusable samples."""


class LabelError(UssError):
    """A label, class id or ontology node cannot be resolved."""


class MetadataError(UssError):
    """AudioSet metadata (ontology.json, class_labels_indices.csv) is missing or malformed."""


class CheckpointError(UssError):
    """A checkpoint cannot be found, parsed, or does not match the model it is loaded into."""


class ConfigError(UssError):
    """A configuration value or command-line combination is invalid."""
