"""A generated, labelled retrieval set: products and questions that each name exactly one of them.

Used by the tests (hybrid >= each single mode) and by bench/search.py and bench/freshness.py. It is
built so that each retriever has a weakness the other covers:
- `name` questions use the product's made-up name ("How much does the Velora cost?"): an exact
  word for full text, a meaningless string of word pieces for the embedder;
- `describe` questions use synonyms of colour and kind ("a crimson oak couch" for "a red oak
  sofa"): the embedder knows they mean the same, full text shares only the material word.
"""

from __future__ import annotations

import random

TABLE_SQL = ("create table {table} (id integer primary key, tenant text, name text not null, kind text, color text,"
             " material text, city text, price numeric(10, 2))")
DOCUMENT = "{name} is a {color} {material} {kind} made in {city}. It costs ${price}."

KINDS = {"sofa": "couch", "lamp": "reading light", "mug": "cup", "rug": "carpet", "desk": "writing table",
         "bicycle": "bike", "jacket": "coat", "backpack": "rucksack", "kettle": "water boiler", "sneakers": "trainers"}
COLORS = {"red": "crimson", "blue": "navy", "green": "emerald", "black": "ebony", "white": "ivory",
          "yellow": "golden", "grey": "ash-coloured", "purple": "violet"}
MATERIALS = ["oak", "steel", "leather", "wool", "glass", "cotton", "bamboo", "copper"]
CITIES = ["Lyon", "Porto", "Osaka", "Quito", "Leeds", "Turin", "Gdansk", "Austin", "Perth", "Cork"]
_SYL = ["ka", "vo", "ri", "len", "ta", "mo", "zu", "bel", "si", "dra", "quo", "ne", "pa", "lix", "ro", "ven", "ul", "mi"]

NAME_QUESTIONS = ["How much does the {name} cost?", "What is the price of {name}?", "Where is the {name} made?"]
DESCRIBE_QUESTIONS = ["Do you sell a {color} {material} {kind}? What does it cost?",
                      "I am looking for a {color} {kind} made of {material}.",
                      "Where is your {color} {material} {kind} manufactured?"]


def products(n: int, seed: int = 0, tenant: str | None = None, start_id: int = 1) -> list[dict]:
    """`n` products with unique names and unique (colour, material, kind) combinations."""
    rng = random.Random(seed)
    combos = [(c, m, k) for c in COLORS for m in MATERIALS for k in KINDS]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} products have unique descriptions")
    rng.shuffle(combos)
    names: set[str] = set()
    out = []
    for i, (color, material, kind) in enumerate(combos[:n]):
        name = ""
        while not name or name in names:
            name = "".join(rng.choice(_SYL) for _ in range(rng.randint(2, 3))).capitalize()
        names.add(name)
        out.append({"id": start_id + i, "tenant": tenant, "name": name, "kind": kind, "color": color,
                    "material": material, "city": rng.choice(CITIES), "price": round(rng.uniform(5, 900), 2)})
    return out


def questions(rows: list[dict], seed: int = 0) -> list[tuple[str, int, str]]:
    """(question, id of the one product it is about, 'name' | 'describe'), two per product."""
    rng = random.Random(seed + 1)
    out = []
    for r in rows:
        out.append((rng.choice(NAME_QUESTIONS).format(**r), r["id"], "name"))
        syn = {"color": COLORS[r["color"]], "kind": KINDS[r["kind"]], "material": r["material"]}
        out.append((rng.choice(DESCRIBE_QUESTIONS).format(**syn), r["id"], "describe"))
    return out


def render(row: dict) -> str:
    """The document text the table template above renders (for benches that skip capture)."""
    return DOCUMENT.format(**row)
