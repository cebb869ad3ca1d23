"""Throwaway experiment of 2026-12-07 (docs/TRANSFER.md, "Bare values as the tuning answers"): the SmolLM2-receiver
translator built into a copy of the kit with a given share of sentence answers, from rows precomputed there (a hard
link to the build's rows checkpoint, kept before the build deleted it). Usage: python tune_values_experiment.py
KITCOPY SHARE (0: bare values, what the kit now does; 0.5: the kit before)."""

import json
import sys
import time
from pathlib import Path

import torch

from fusion.models import LanguageModel
from fusion.train_cli import fit_translator_pair
from ops.real.build import (
    TRANSLATOR_GENERIC,
    TRANSLATOR_NOTE_BLOCKS,
    TRANSLATOR_TUNE_GENERIC,
    TRANSLATOR_TUNE_QUESTIONS,
    TRANSLATOR_TUNE_STEPS,
    TRANSLATOR_WEIGHTS,
)
from ops.real.data import translator_blocks, translator_tune_items
from ops.real.world import NotesWorld

kit, share = Path(sys.argv[1]), float(sys.argv[2])
world = NotesWorld.model_validate_json((kit / "world.json").read_text())
blocks = translator_blocks(world, TRANSLATOR_NOTE_BLOCKS, TRANSLATOR_GENERIC, 0)
items = translator_tune_items(world, TRANSLATOR_TUNE_QUESTIONS, TRANSLATOR_TUNE_GENERIC, 0, share)
receiver = LanguageModel.load(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
transmitter = LanguageModel.load(".cache/models/gemma-3-270m-q4_k_m.gguf")
torch.set_num_threads(2)
start = time.perf_counter()
result = fit_translator_pair(
    receiver,
    transmitter,
    blocks,
    kit / "fusers",
    seed=0,
    resume=True,
    tune_items=items,
    tune_steps=TRANSLATOR_TUNE_STEPS,
    weights=TRANSLATOR_WEIGHTS,
)
print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1), time.perf_counter() - start)
