import os
import sys

# Make tests/ importable (dist_utils) and keep CPU tests single-threaded per process:
# the machines have 2 cores and distributed tests run several processes at once.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
