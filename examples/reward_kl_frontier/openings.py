"""Story openings for the frontier example: simple first sentences made from templates and small word lists.

    python openings.py OUT.jsonl N    # write the first N openings as a prompts file ({"id", "prompt"} rows)
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Anna", "Tim", "Mia", "Sam", "Lucy", "Jack", "Emma", "Bob", "Sara",
         "Leo", "Zoe", "Joe", "Amy", "Kim", "Dan"]
ANIMALS = ["dog", "cat", "bird", "bunny", "fox", "bear", "frog", "duck", "mouse", "fish"]
THINGS = ["ball", "box", "hat", "kite", "cake", "toy car", "book", "shell", "stick", "balloon"]
PLACES = ["park", "garden", "forest", "house", "beach", "school", "lake", "farm", "shop", "hill"]
OPENINGS = [
    "Once upon a time, there was a little {animal} named {name}.",
    "One day, {name} went to the {place}.",
    "{name} found a {thing} in the {place}.",
    "{name} had a big {thing}.",
    "{name} and the {animal} played in the {place}.",
    "The {animal} saw a {thing} near the {place}.",
    "{name} wanted to go to the {place} with the {animal}.",
    "It was a sunny day. {name} took the {thing} to the {place}.",
]


def story_openings(count: int, seed: int = 0) -> list[str]:
    """`count` distinct openings, drawn without replacement from the template x word combinations."""
    combos = [template.format(name=name, animal=animal, thing=thing, place=place)
              for template, name, animal, thing, place in itertools.product(OPENINGS, NAMES, ANIMALS, THINGS, PLACES)]
    unique = sorted(set(combos))
    random.Random(seed).shuffle(unique)
    if count > len(unique):
        raise ValueError(f"only {len(unique)} distinct openings")
    return unique[:count]


def write_prompts(path: str, count: int) -> None:
    rows = [{"id": f"opening-{i}", "prompt": text} for i, text in enumerate(story_openings(count))]
    Path(path).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    write_prompts(sys.argv[1], int(sys.argv[2]))
