"""Experiment: the SmolLM2-receiver translator tuned with value-only answers to the training-fact questions
(instead of half sentences), built into a kit copy from precomputed rows. Usage: python tune_values.py KITCOPY SHARE"""
import json, sys, time, random
from pathlib import Path
import torch
from fusion.models import LanguageModel
from fusion.train_cli import fit_translator_pair
from ops.real.data import translator_blocks, generic_paragraphs
from ops.real.world import NotesWorld, ALL_ATTRIBUTES
from ops.real.build import TRANSLATOR_NOTE_BLOCKS, TRANSLATOR_GENERIC, TRANSLATOR_TUNE_QUESTIONS, TRANSLATOR_TUNE_GENERIC, TRANSLATOR_TUNE_STEPS, TRANSLATOR_WEIGHTS
from fusion.translate import TuneItem, repeat_item
kit = Path(sys.argv[1]); share = float(sys.argv[2])
world = NotesWorld.model_validate_json((kit / "world.json").read_text())
blocks = translator_blocks(world, TRANSLATOR_NOTE_BLOCKS, TRANSLATOR_GENERIC, 0)
rng = random.Random("translator-tune/0")  # as ops.real.data.translator_tune_items, with the sentence share changed
facts = world.split("train"); items = []
for _ in range(TRANSLATOR_TUNE_QUESTIONS):
    picked = rng.sample(facts, min(3, len(facts))); fact = rng.choice(picked)
    stem = rng.choice(ALL_ATTRIBUTES[fact.attribute].questions).format(entity=fact.entity)
    answer = fact.sentence if rng.random() < share else fact.value
    items.append(TuneItem(tuple(f.sentence for f in picked), stem, answer))
items += [repeat_item([p]) for p in generic_paragraphs(TRANSLATOR_TUNE_GENERIC, 1)]
rx = LanguageModel.load(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")
tx = LanguageModel.load(".cache/models/gemma-3-270m-q4_k_m.gguf")
torch.set_num_threads(2)
t = time.perf_counter()
res = fit_translator_pair(rx, tx, blocks, kit / "fusers", seed=0, resume=True, tune_items=items, tune_steps=TRANSLATOR_TUNE_STEPS, weights=TRANSLATOR_WEIGHTS)
print(json.dumps({k: v for k, v in res.items() if not isinstance(v, list)}, indent=1), time.perf_counter() - t)
