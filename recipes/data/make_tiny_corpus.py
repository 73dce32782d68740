"""Writes tiny_corpus.txt: plain English prose composed for this project (no third-party text), one paragraph per
document, for recipes/tiny_pretrain_demo.yaml. Deterministic: `python make_tiny_corpus.py` rewrites the same file."""

import random
from pathlib import Path

PEOPLE = ["the miller", "the weaver", "a young shepherd", "the old ferryman", "the baker's daughter",
          "a travelling tinker", "the schoolmistress", "the lighthouse keeper", "a fisherman", "the village clerk"]
PLACES = ["by the river", "on the hill road", "in the market square", "at the edge of the forest", "near the harbour",
          "beside the stone bridge", "under the great oak", "in the orchard", "at the crossroads", "on the frozen lake"]
TIMES = ["One morning in early spring", "Late on a windy autumn evening", "At midday in high summer",
         "Before dawn on a cold winter day", "On the first market day of the year", "After a week of heavy rain"]
ACTS = ["found a small wooden box", "heard a bell ringing far away", "counted the sacks of grain twice",
        "mended a torn sail", "planted a row of young apple trees", "wrote a long letter to a distant cousin",
        "lost a silver button", "saw a heron standing in the shallows", "carried water up from the well",
        "listened to the wind in the chimney"]
THOUGHTS = ["It seemed a small thing, yet it stayed in mind for many days.",
            "Nobody else in the village paid it any attention.",
            "The neighbours talked of nothing else until the harvest.",
            "There was, after all, a great deal of work still to be done.",
            "Such things had happened before, and would happen again.",
            "The evening grew quiet, and the lamps were lit one by one."]
ENDINGS = ["In the end the box held only three old coins and a pressed flower.",
           "By the time the snow came, the matter was settled.",
           "The story was told and retold, a little longer each winter.",
           "When the river rose again, everyone remembered that day.",
           "The work went on, as it always does, from season to season."]


def paragraph(rng: random.Random) -> str:
    who, where = rng.choice(PEOPLE), rng.choice(PLACES)
    sentences = [f"{rng.choice(TIMES)}, {who} {rng.choice(ACTS)} {where}."]
    for _ in range(rng.randint(2, 5)):
        other = rng.choice(PEOPLE)
        sentences.append(f"Later {other} {rng.choice(ACTS)} {rng.choice(PLACES)}, and {rng.choice(THOUGHTS).lower()}")  # noqa: E501
    sentences.append(rng.choice(ENDINGS))
    return " ".join(s[0].upper() + s[1:] for s in sentences)


if __name__ == "__main__":
    rng = random.Random(0)
    text = "\n\n".join(paragraph(rng) for _ in range(200)) + "\n"
    Path(__file__).with_name("tiny_corpus.txt").write_text(text, encoding="utf-8")
