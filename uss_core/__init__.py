"""uss_core: the universal source separation library (no Ray imports).

Models (ResUNet + FiLM, PANNs Cnn14 family, query nets), audio I/O, the AudioSet
ontology and label sets, the separation engine, metrics and checkpoints.
"""

__version__ = "0.1.0"
