"""Large pools of answer values, built offline from the word lists the ``faker`` package ships (en_US).

A fuser that sees a few dozen values learns which of them to say, not how to carry what the transmitter read
(REALWORLD.md); these pools give thousands of distinct values of several forms (single words, names, numbers,
multi-token phrases). Every pool is a pure function of Faker's static lists and a seed, sorted, deduplicated.

| kind | source | size (about) | form |
|---|---|---|---|
| ``word`` | lorem ``word_list`` | 970 | one word |
| ``name`` | person ``first_names`` x ``last_names`` | 4000 sampled | two words |
| ``job`` | job ``jobs`` | 640 | one to six words |
| ``color`` | color ``all_colors`` split at capitals | 140 | one to three words |
| ``city`` | city prefix/suffix around a first name | 3000 sampled | one or two words |
| ``number`` | integers 10..9999 | 3000 sampled | digits |
| ``phrase`` | company ``catch_phrase_words`` triples | 3000 sampled | three words |
"""

from __future__ import annotations

import random
import re
from functools import cache

DEFAULT_SAMPLE = 3000  # values drawn from a combinatorial pool (names, cities, numbers, phrases)


def _clean(values) -> tuple[str, ...]:
    out = sorted({" ".join(str(v).split()) for v in values if str(v).strip()})
    return tuple(v for v in out if "\n" not in v)


@cache
def value_pool(kind: str, seed: int = 0) -> tuple[str, ...]:
    """The values of one kind (see the module table)."""
    rng = random.Random(f"values/{kind}/{seed}")
    if kind == "word":
        from faker.providers.lorem.en_US import Provider as Lorem

        return _clean(w for w in Lorem.word_list if w.isalpha() and len(w) > 2)
    if kind == "name":
        from faker.providers.person.en_US import Provider as Person

        firsts, lasts = sorted(Person.first_names), sorted(Person.last_names)
        return _clean(f"{rng.choice(firsts)} {rng.choice(lasts)}" for _ in range(DEFAULT_SAMPLE + 1000))
    if kind == "job":
        from faker.providers.job.en_US import Provider as Job

        return _clean(j.split(",")[0] for j in Job.jobs)
    if kind == "color":
        from faker.providers.color.en_US import Provider as Color

        return _clean(re.sub(r"(?<!^)(?=[A-Z])", " ", c).lower() for c in Color.all_colors)
    if kind == "city":
        from faker.providers.address.en_US import Provider as Address
        from faker.providers.person.en_US import Provider as Person

        names = sorted(set(Person.first_names) | set(Person.last_names))
        prefixes, suffixes = Address.city_prefixes, Address.city_suffixes
        cities = []
        for _ in range(DEFAULT_SAMPLE + 1000):
            name = rng.choice(names)
            cities.append(f"{rng.choice(prefixes)} {name}" if rng.random() < 0.4 else f"{name}{rng.choice(suffixes)}")
        return _clean(cities)
    if kind == "number":
        return _clean(str(n) for n in rng.sample(range(10, 10000), DEFAULT_SAMPLE))
    if kind == "phrase":
        from faker.providers.company.en_US import Provider as Company

        a, b, c = (sorted(set(words)) for words in Company.catch_phrase_words)
        return _clean(f"{rng.choice(a)} {rng.choice(b)} {rng.choice(c)}".lower() for _ in range(DEFAULT_SAMPLE))
    raise KeyError(f"unknown value kind {kind!r}")


def split_pool(values: tuple[str, ...], test_share: float, seed: int = 0) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(train, test)``: disjoint values, a seeded ``test_share`` of them held out."""
    order = list(values)
    random.Random(f"value-split/{seed}").shuffle(order)
    n = round(len(order) * test_share)
    return tuple(sorted(order[n:])), tuple(sorted(order[:n]))
