"""Writes the chat demo's data: short multi-turn conversations with checkable answers, in `messages` format.

Every conversation is generated here (no third-party text), so the demo ships with data the project owns: an
arithmetic question and a follow-up on its result, a unit conversion and its inverse, a country's capital and then
its continent. Train and held-out splits are drawn from the same families with disjoint questions.

    python recipes/data/make_chat_demo.py   # rewrites chat_demo_train.json and chat_demo_eval.json
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "You are a concise assistant. Answer in one short sentence."
# (country, capital, continent): capitals as of 2024
COUNTRIES = [
    ("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"), ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"), ("Portugal", "Lisbon", "Europe"), ("Greece", "Athens", "Europe"),
    ("Poland", "Warsaw", "Europe"), ("Norway", "Oslo", "Europe"), ("Sweden", "Stockholm", "Europe"),
    ("Finland", "Helsinki", "Europe"), ("Austria", "Vienna", "Europe"), ("Ireland", "Dublin", "Europe"),
    ("Japan", "Tokyo", "Asia"), ("China", "Beijing", "Asia"), ("India", "New Delhi", "Asia"),
    ("Thailand", "Bangkok", "Asia"), ("Vietnam", "Hanoi", "Asia"), ("South Korea", "Seoul", "Asia"),
    ("Indonesia", "Jakarta", "Asia"), ("Egypt", "Cairo", "Africa"), ("Kenya", "Nairobi", "Africa"),
    ("Nigeria", "Abuja", "Africa"), ("Ghana", "Accra", "Africa"), ("Morocco", "Rabat", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"), ("Canada", "Ottawa", "North America"),
    ("Mexico", "Mexico City", "North America"), ("Cuba", "Havana", "North America"),
    ("Brazil", "Brasilia", "South America"), ("Argentina", "Buenos Aires", "South America"),
    ("Peru", "Lima", "South America"), ("Chile", "Santiago", "South America"),
    ("Australia", "Canberra", "Oceania"), ("New Zealand", "Wellington", "Oceania"),
]  # fmt: skip
# (unit, its plural, other unit, its plural, factor: 1 unit = factor other units)
UNITS = [
    ("kilometre", "kilometres", "metre", "metres", 1000), ("metre", "metres", "centimetre", "centimetres", 100),
    ("kilogram", "kilograms", "gram", "grams", 1000), ("litre", "litres", "millilitre", "millilitres", 1000),
    ("hour", "hours", "minute", "minutes", 60), ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24), ("week", "weeks", "day", "days", 7),
]  # fmt: skip


def chat(*turns: str, system: bool = False) -> dict:
    roles = ["user", "assistant"] * (len(turns) // 2)
    messages = [{"role": r, "content": t} for r, t in zip(roles, turns, strict=True)]
    return {"messages": ([{"role": "system", "content": SYSTEM}] if system else []) + messages}


def arithmetic(rng: random.Random, seen: set) -> dict:
    while True:
        a, b, k = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 5)
        if (a, b, k) not in seen:
            seen.add((a, b, k))
            break
    total = a + b
    return chat(f"What is {a} + {b}?", f"{a} + {b} = {total}.",
                f"And if you multiply that by {k}?", f"{total} x {k} = {total * k}.",
                f"Now subtract {a}.", f"{total * k} - {a} = {total * k - a}.",
                system=rng.random() < 0.5)  # fmt: skip


def conversion(rng: random.Random, seen: set) -> dict:
    while True:
        unit, units, other, others, factor = rng.choice(UNITS)
        n = rng.randint(2, 12)
        if (unit, n) not in seen:
            seen.add((unit, n))
            break
    return chat(f"How many {others} are in {n} {units}?", f"{n} {units} are {n * factor} {others}.",
                f"And how many {others} are in one {unit}?", f"One {unit} is {factor} {others}.",
                system=rng.random() < 0.5)  # fmt: skip


def capital(country: tuple[str, str, str], rng: random.Random) -> dict:
    name, city, continent = country
    return chat(f"What is the capital of {name}?", f"The capital of {name} is {city}.",
                "Which continent is it on?", f"{city} is in {continent}.",
                system=rng.random() < 0.5)  # fmt: skip


def main() -> None:
    rng = random.Random(15)
    seen_a: set = set()
    seen_c: set = set()
    countries = COUNTRIES[:]
    rng.shuffle(countries)
    held_countries, train_countries = countries[:6], countries[6:]
    train = [arithmetic(rng, seen_a) for _ in range(70)] + [conversion(rng, seen_c) for _ in range(50)]
    train += [capital(c, rng) for c in train_countries]
    held = [arithmetic(rng, seen_a) for _ in range(12)] + [conversion(rng, seen_c) for _ in range(12)]
    held += [capital(c, rng) for c in held_countries]
    rng.shuffle(train)
    here = Path(__file__).parent
    for name, rows in (("chat_demo_train.json", train), ("chat_demo_eval.json", held)):
        (here / name).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
        print(f"{name}: {len(rows)} conversations")


if __name__ == "__main__":
    main()
