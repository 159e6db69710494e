"""generate — the embedded demo world: deterministic from a seed, no downloads.

A tiny world of animals with facts (color, home, food), a narrative grammar for general text, and
arithmetic word problems. It writes the four raw record kinds, the benchmarks the gate evaluates on,
and a manifest of every planted defect (junk, exact and near duplicates, benchmark leaks) so tests can
check that curation removes exactly those, for the right reason. Schemas: docs/data.md.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from stagewise.config import GenerateConfig
from stagewise.records import write_jsonl

ANIMALS = [
    "fox", "owl", "bear", "wolf", "deer", "hare", "crow", "frog", "mole", "duck", "goat", "lynx",
    "seal", "swan", "toad", "wren", "newt", "mouse", "otter", "moose", "horse", "sheep", "camel",
    "tiger", "zebra", "whale", "shark", "eagle", "raven", "robin", "heron", "stork", "crane", "snail",
    "beetle", "badger", "beaver", "ferret", "turtle", "lizard", "parrot", "pigeon", "rabbit",
    "donkey", "monkey", "panda", "koala", "lemur", "bison", "llama", "gecko", "squid", "crab",
    "lobster", "salmon", "trout", "falcon", "magpie", "finch", "hamster", "weasel", "walrus",
    "puffin", "jackal",
]
COLORS = ["red", "blue", "green", "brown", "gray", "white", "black", "yellow"]
HOMES = ["forest", "river", "cave", "hill", "lake", "meadow", "desert", "marsh"]
FOODS = ["berries", "fish", "seeds", "grass", "insects", "nuts", "roots", "leaves"]
ATTRS = ("color", "home", "food")

# Fact sentences (corpus) and question paraphrases (chat / benchmarks), per attribute.
FACT_FORMS = {
    "color": ["The {a} is {v}.", "The fur of the {a} is {v}.", "Everyone knows the {a} is {v}."],
    "home": ["The {a} lives in the {v}.", "The home of the {a} is the {v}.", "Every night the {a} sleeps in the {v}."],
    "food": ["The {a} eats {v}.", "The {a} likes to eat {v}.", "Each day the {a} looks for {v}."],
}
QUESTION_FORMS = {
    "color": ["What color is the {a}?", "Which color does the {a} have?"],
    "home": ["Where does the {a} live?", "Where is the home of the {a}?"],
    "food": ["What does the {a} eat?", "What food does the {a} like?"],
}
ANSWER_FORM = {"color": "The {a} is {v}.", "home": "The {a} lives in the {v}.", "food": "The {a} eats {v}."}
PREFIXES = ["", "Please tell me: ", "Quick question: ", "I wonder, ", "Can you answer this? "]

# Narrative grammar for general text: large enough that 13-word windows never repeat by chance.
NAMES = ["Ana", "Ben", "Mia", "Tom", "Lea", "Max", "Ivy", "Sam", "Eva", "Leo", "Zoe", "Kai", "Ada",
         "Jon", "Nia", "Oli", "Ruth", "Paul", "Iris", "Hugo"]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "On Monday", "On a cold day",
         "After the rain", "Before dinner", "Last summer", "Every spring", "On Sunday", "At dawn"]
VERBS = ["walked to", "looked at", "painted", "cleaned", "visited", "found", "built", "carried",
         "opened", "watched", "fixed", "drew", "passed", "closed", "liked", "showed"]
ADJS = ["old", "small", "tall", "quiet", "bright", "narrow", "wooden", "busy", "empty", "warm",
        "round", "heavy", "clean", "strange", "pretty", "dark", "long", "gentle", "broken", "new"]
NOUNS = ["bridge", "house", "garden", "boat", "window", "table", "road", "school", "market",
         "tower", "fence", "kitchen", "library", "station", "door", "basket", "lamp", "wagon"]
PLACES = ["near the river", "by the old mill", "behind the school", "at the edge of town",
          "next to the bakery", "on the hill", "under the big tree", "across the square",
          "beside the harbor", "in the village"]

OBJECTS = ["apples", "pens", "shells", "coins", "cards", "stones", "books", "cups", "eggs", "kites"]
PRONOUN = {n: ("She" if n in {"Ana", "Mia", "Lea", "Ivy", "Eva", "Zoe", "Ada", "Nia", "Ruth", "Iris"} else "He")
           for n in NAMES}
# Seen templates feed training and the in-distribution benchmark; unseen ones only the benchmark
# `arithmetic_unseen` (SFT memorizes phrasing, RL should generalize: issue #4 measures that).
SEEN_TEMPLATES = [
    ("{n} has {a} {o}. {p} gets {b} more {o}. How many {o} does {n} have now?", "add"),
    ("{n} had {a} {o} and gave {b} to a friend. How many {o} does {n} have left?", "sub"),
    ("There are {a} {o} in a box. {n} puts in {b} more. How many {o} are in the box?", "add"),
    ("{n} buys {a} bags with {b} {o} in each bag. How many {o} does {n} buy?", "mul"),
]
UNSEEN_TEMPLATES = [
    ("A shelf holds {a} {o}. Then {b} {o} are taken away. How many {o} are on the shelf?", "sub"),
    ("{n} finds {a} {o} in the morning and {b} {o} in the evening. How many {o} did {n} find in total?", "add"),
]

JUNK_KINDS = ["short", "symbols", "no_alpha", "no_stopwords", "repetition", "boilerplate"]


@dataclass(frozen=True)
class World:
    facts: dict[str, dict[str, str]]            # animal → attr → value
    train_pairs: list[tuple[str, str]]          # (animal, attr) usable in training chat/preference
    heldout_pairs: list[tuple[str, str]]        # (animal, attr) only in benchmarks


def build_world(rng: random.Random) -> World:
    facts = {a: {"color": rng.choice(COLORS), "home": rng.choice(HOMES), "food": rng.choice(FOODS)} for a in ANIMALS}
    pairs = [(a, k) for a in ANIMALS for k in ATTRS]
    rng.shuffle(pairs)
    cut = len(pairs) // 4
    return World(facts, sorted(pairs[cut:]), sorted(pairs[:cut]))


# ---------------------------------------------------------------- text makers
def narrative_sentence(rng: random.Random, names: list[str] = NAMES) -> str:
    form = rng.randrange(4)
    n, n2 = rng.sample(names, 2)
    if form == 0:
        return f"{rng.choice(TIMES)}, {n} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}."
    if form == 1:
        return f"{n} and {n2} {rng.choice(VERBS)} a {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(PLACES)}."
    if form == 2:
        a1, a2 = rng.sample(ADJS, 2)
        return f"The {rng.choice(NOUNS)} {rng.choice(PLACES)} was {a1} and {a2}."
    return f"{n} said that the {rng.choice(NOUNS)} {rng.choice(PLACES)} was {rng.choice(ADJS)}."


def fact_sentence(world: World, rng: random.Random) -> str:
    animal = rng.choice(ANIMALS)
    attr = rng.choice(ATTRS)
    return rng.choice(FACT_FORMS[attr]).format(a=animal, v=world.facts[animal][attr])


def arithmetic(rng: random.Random, templates) -> tuple[str, int, str, str]:
    template, op = rng.choice(templates)
    n, o = rng.choice(NAMES), rng.choice(OBJECTS)
    if op == "mul":
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        ans = a * b
    elif op == "sub":
        a = rng.randint(3, 12)
        b = rng.randint(1, a - 1)
        ans = a - b
    else:
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        ans = a + b
    return template.format(n=n, a=a, b=b, o=o, p=PRONOUN[n]), ans, n, o


def solution(answer: int) -> str:
    # One fixed answer format: the reward parser and the eval filter both read "The answer is N."
    return f"The answer is {answer}."


def document(world: World, rng: random.Random, n_sentences: int) -> str:
    # Facts never stand next to each other: a narrative sentence between them keeps every 13-word
    # window unique to its document, so benchmark decontamination only fires on planted leaks.
    sents = []
    for i in range(n_sentences):
        sents.append(fact_sentence(world, rng) if i % 2 == 1 else narrative_sentence(rng))
    # arithmetic statements teach numbers in context (seen templates only)
    q, ans, n, o = arithmetic(rng, SEEN_TEMPLATES)
    sents.insert(rng.randrange(0, len(sents), 2), f"{n} counted the {o} and the total was {ans}.")
    cut = len(sents) // 2
    return " ".join(sents[:cut]) + "\n\n" + " ".join(sents[cut:])


def junk_document(kind: str, rng: random.Random) -> str:
    # Each kind trips exactly one family of quality rules (tasks/quality.py), and passes the rules
    # that run before it, so the curation test can check the *reason* as well as the removal:
    # short/symbols/no_alpha/no_stopwords -> Gopher quality, repetition -> Gopher repetition,
    # boilerplate -> C4.
    if kind == "short":
        return f"Click here to buy {rng.choice(NOUNS)}s now."
    if kind == "symbols":  # >= 50 real words, so the hash/ellipsis ratio (not the length) trips
        return " ".join(rng.choice(["#", "###", "...", "#tag", "…", "##"]) + f" {rng.choice(NOUNS)}" for _ in range(70))
    if kind == "no_alpha":  # digits only: no word has a letter (hex ids would, most of the time)
        return " ".join(f"{rng.randrange(10**4, 10**6)}-{rng.randrange(100, 999)}" for _ in range(60))
    if kind == "no_stopwords":
        return " ".join(rng.choice(ADJS + NOUNS + COLORS + HOMES) for _ in range(70)) + "."
    if kind == "repetition":  # the added clause carries >= 2 stop words, so Gopher quality passes it
        line = f"{narrative_sentence(rng)} The {rng.choice(NOUNS)} of the {rng.choice(NOUNS)} was {rng.choice(ADJS)} and {rng.choice(ADJS)}."
        return "\n".join([line] * 30)
    # boilerplate: a web page around real text, what C4's line/document rules exist for
    return "\n".join([
        "Home | About | Contact | Shop",
        " ".join(narrative_sentence(rng) for _ in range(6)),
        "This website uses cookies. Accept the cookie policy and terms of use to continue.",
        "Please enable JavaScript in your browser to see this page.",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt.",
    ])


def near_duplicate(text: str, rng: random.Random) -> str:
    """Substitute one word per ~60: word 5-gram Jaccard with the original lands near 0.8-0.9."""
    words = text.split(" ")
    n_subs = max(1, len(words) // 60)
    # only plain words: substituting at "river." or "7" would be skipped and leave an exact copy
    for pos in rng.sample([i for i in range(2, len(words) - 2) if words[i].isalpha()], n_subs):
        words[pos] = rng.choice([w for w in ADJS if w != words[pos]])
    return " ".join(words)


def chat(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------- tool use
# Four tools over the world's own facts. Schemas are minimal (the demo trains on 128-token windows).
def _fn(name: str, props: dict[str, str]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": {k: {"type": t} for k, t in props.items()}, "required": list(props)}}}


DEMO_TOOLS = [_fn("food", {"animal": "string"}), _fn("color", {"animal": "string"}),
              _fn("add", {"a": "integer", "b": "integer"}), _fn("km_to_m", {"km": "integer"})]
# The animal is quoted, as an argument is: the demo's byte-level BPE reads " stork" (after a space) and
# "stork" (after a quote, as in the call's JSON) as different tokens (Ġstork vs st|ork), so unquoted, a
# call to a held-out animal needs a spelling the 0.9M model never saw; quoted, the call repeats the
# question's own tokens (docs/data.md#tool-use-chats).
TOOL_ASK = {"food": 'look up what "{animal}" eats', "color": 'look up the color of "{animal}"',
            "add": "add {a} and {b}", "km_to_m": "convert {km} km to meters"}
TOOL_SAY = {"food": "The {animal} eats {r}.", "color": "The {animal} is {r}.", "add": "{a} plus {b} is {r}.",
            "km_to_m": "{km} km is {r} meters."}
# Parallel pairs seen in training; the benchmark also asks for pairs never seen together (food + add, ...).
TRAIN_PAIRS = [("food", "color"), ("add", "add"), ("color", "km_to_m")]
UNSEEN_PAIRS = [("food", "add"), ("color", "add")]
NO_TOOL = ["Say hello to {n}.", "Greet {n} for me.", "Write a short hello to {n}.", "Send a warm hello to {n}.",
           "Please say hi to {n}.", "Give my greetings to {n}."]   # never the eval's "Wish {n} a good day."
# Questions no tool answers (home): answered in text, like the plain chats do.
NO_TOOL_HOME = ["Tell me where the {a} lives.", "Where does the {a} live?"]


def _tool_args(name: str, animals: list[str], rng: random.Random) -> dict:
    if name in ("food", "color"):
        return {"animal": rng.choice(animals)}
    if name == "add":
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if (a, b) not in TOOL_EVAL_SUMS:
                return {"a": a, "b": b}
    return {"km": rng.randint(2, 60)}


def _tool_result(world: World, name: str, args: dict) -> str:
    if name in ("food", "color"):
        return world.facts[args["animal"]][name]
    return str(args["a"] + args["b"]) if name == "add" else str(args["km"] * 1000)


def declared(names: tuple[str, ...], rng: random.Random) -> list[dict]:
    """The tools a record declares: the ones it needs and one other (choosing is part of the skill),
    in a random order; the demo's 128-token windows have no room for all four schemas."""
    names = list(dict.fromkeys(names))
    names.append(rng.choice([n for n in TOOL_ASK if n not in names]))
    rng.shuffle(names)
    return [t for n in names for t in DEMO_TOOLS if t["function"]["name"] == n]


def tool_chat(world: World, names: tuple[str, ...], args: list[dict], i: int, tools: list[dict]) -> dict:
    """A question → calls → results → the answer, OpenAI-shaped (docs/data.md)."""
    ask = " and ".join(TOOL_ASK[n].format(**a) for n, a in zip(names, args))
    calls = [{"id": f"call_{i}_{j}", "type": "function", "function": {"name": n, "arguments": a}}
             for j, (n, a) in enumerate(zip(names, args))]
    results = [_tool_result(world, n, a) for n, a in zip(names, args)]
    msgs = [{"role": "user", "content": f"Please {ask}."}, {"role": "assistant", "content": "", "tool_calls": calls}]
    msgs += [{"role": "tool", "tool_call_id": c["id"], "content": r} for c, r in zip(calls, results)]
    msgs.append({"role": "assistant", "content": " ".join(TOOL_SAY[n].format(r=r, **a)
                                                         for n, a, r in zip(names, args, results))})
    return {"tools": tools, "messages": msgs}


def tool_chats(world: World, n: int, rng: random.Random, no_call_share: float = 0.15) -> list[dict]:
    """No tool fits (`no_call_share`: a greeting, or a home question in text); of the rest, single calls
    (70%) and parallel pairs (30%).

    Lookups use only training (animal, attribute) pairs: a tool result never teaches a held-out fact.
    """
    by_attr = {k: sorted({a for a, kk in world.train_pairs if kk == k}) for k in ATTRS}
    animals = {"food": [a for a in by_attr["food"] if a not in TOOL_EVAL_ANIMALS],
               "color": [a for a in by_attr["color"] if a not in TOOL_EVAL_ANIMALS]}
    out, keys = [], set()
    while len(out) < n:
        if rng.random() < no_call_share:
            if rng.random() < 0.5:
                q = rng.choice(NO_TOOL).format(n=rng.choice(NAMES))
                rec = {"tools": declared((), rng), "messages": chat(q, f"Hello, {q.split()[-1].rstrip('.')}!")}
            else:
                a = rng.choice([x for x in by_attr["home"] if x not in TOOL_EVAL_ANIMALS])
                rec = {"tools": declared((), rng), "messages": chat(rng.choice(NO_TOOL_HOME).format(a=a),
                                                             ANSWER_FORM["home"].format(a=a, v=world.facts[a]["home"]))}
        else:
            names = (rng.choice(list(TOOL_ASK)),) if rng.random() < 0.7 else rng.choice(TRAIN_PAIRS)
            args = [_tool_args(nm, animals.get(nm, []), rng) for nm in names]
            rec = tool_chat(world, names, args, len(out), declared(names, rng))
        key = json.dumps(rec["messages"][0]["content"])
        if key in keys:   # the same question twice would be an exact duplicate
            continue
        keys.add(key)
        out.append(rec)
    return out


# Held out of every tool call in training: these animals as arguments, these sums.
TOOL_EVAL_ANIMALS = frozenset(ANIMALS[-16:])
TOOL_EVAL_SUMS = frozenset((a, b) for a in range(10, 100) for b in range(10, 100) if (a * 7 + b) % 5 == 0)


def tools_benchmark(world: World, n: int, rng: random.Random) -> list[dict]:
    """`tools` eval items (docs/evaluation.md): unseen argument values (held-out animals, sums never
    asked in training) and unseen pairs of tools; a fifth expect no call."""
    out, asked = [], set()
    eval_animals = sorted(TOOL_EVAL_ANIMALS)
    sums = sorted(TOOL_EVAL_SUMS)
    while len(out) < n:
        u = rng.random()
        if u < 0.2:
            a = rng.choice(eval_animals)
            # a home question (no tool answers it) about a held-out animal, or a greeting phrased unlike training's
            q = rng.choice([f"Tell me where the {a} lives.", f"Wish {rng.choice(NAMES)} a good day."])
            expected: list[dict] = []
        else:
            names = (rng.choice(list(TOOL_ASK)),) if u < 0.7 else rng.choice(TRAIN_PAIRS + UNSEEN_PAIRS * 2)
            args = []
            for nm in names:
                if nm in ("food", "color"):
                    args.append({"animal": rng.choice(eval_animals)})
                elif nm == "add":
                    a, b = rng.choice(sums)
                    args.append({"a": a, "b": b})
                else:
                    args.append({"km": rng.randint(61, 99)})
            q = "Please " + " and ".join(TOOL_ASK[nm].format(**a) for nm, a in zip(names, args)) + "."
            expected = [{"name": nm, "arguments": a} for nm, a in zip(names, args)]
        if q in asked:
            continue
        asked.add(q)
        tools = declared(tuple(c["name"] for c in expected), rng)
        out.append({"id": f"tl-{len(out):04d}", "messages": [{"role": "user", "content": q}], "tools": tools,
                    "expected": expected})
    return out


# ---------------------------------------------------------------- the step
def generate(cfg: GenerateConfig, out_dir: Path) -> dict:
    """Write data/01_raw: four record kinds, benchmarks/, manifest.json. Returns counts."""
    rng = random.Random(cfg.seed)
    world = build_world(rng)
    bench = _benchmarks(world, cfg, rng)
    records, manifest = {}, {}

    # corpus ------------------------------------------------------------------
    clean = [document(world, rng, rng.randint(9, 13)) for _ in range(cfg.n_docs)]
    corpus = [{"text": t, "_tag": None} for t in clean]
    m = {"junk": {}, "exact_dup": {}, "near_dup": {}, "leak": {}}
    for i in range(cfg.n_exact_dup):
        src = rng.randrange(cfg.n_docs)
        corpus.append({"text": clean[src], "_tag": ("exact_dup", src)})
    for i in range(cfg.n_near_dup):
        src = rng.randrange(cfg.n_docs)
        corpus.append({"text": near_duplicate(clean[src], rng), "_tag": ("near_dup", src)})
    for i in range(cfg.n_junk):
        kind = JUNK_KINDS[i % len(JUNK_KINDS)]
        corpus.append({"text": junk_document(kind, rng), "_tag": ("junk", kind)})
    for i in range(cfg.n_leaks):
        item = bench["general_text"][i % len(bench["general_text"])]
        doc = document(world, rng, 8).split("\n\n")
        corpus.append({"text": doc[0] + " " + item["text"] + "\n\n" + doc[1], "_tag": ("leak", f"general_text:{item['id']}")})
    records["corpus"], m = _place(corpus, rng, "c", m)
    records["corpus"] += copy_documents(cfg)   # their own generator: the rest of the world is unchanged
    manifest["corpus"] = m

    # chat --------------------------------------------------------------------
    qa = [(p + q.format(a=a), ANSWER_FORM[k].format(a=a, v=world.facts[a][k]))
          for (a, k) in world.train_pairs for q in QUESTION_FORMS[k] for p in PREFIXES]
    rng.shuffle(qa)
    n_arith = int(cfg.n_chat * cfg.arith_share)
    chats = [chat(q, a) for q, a in qa[: cfg.n_chat - n_arith]]
    seen_q = set()
    while len(chats) < cfg.n_chat:
        q, ans, _, _ = arithmetic(rng, SEEN_TEMPLATES)
        if q not in seen_q and q not in bench["_arith_questions"] and not _near_benchmark(q, bench):
            seen_q.add(q)
            chats.append(chat(q, solution(ans)))
    items = [{"messages": c, "_tag": None} for c in chats]
    n_plant = max(2, cfg.n_chat // 50)
    for i in range(n_plant):
        src = rng.randrange(len(chats))
        items.append({"messages": chats[src], "_tag": ("exact_dup", src)})
        bad = [chat(chats[src][0]["content"], ""), list(reversed(chats[src])), [{"role": "user", "content": "Hi"}]][i % 3]
        items.append({"messages": bad, "_tag": ("junk", ["empty_response", "role_order", "no_response"][i % 3])})
        item = bench["instruct"][i % len(bench["instruct"])]
        items.append({"messages": chat(item["question"], item["answer"]), "_tag": ("leak", f"instruct:{item['id']}")})
    records["chat"], manifest["chat"] = _place(items, rng, "chat", {"junk": {}, "exact_dup": {}, "near_dup": {}, "leak": {}})
    # tool-use chats: their own random stream and ids, so the rest of the world is the same with or without them
    if cfg.n_tool_chat:
        tool_rng = random.Random(cfg.seed + 1)
        bench["tools"] = tools_benchmark(world, cfg.n_eval, tool_rng)
        chats = tool_chats(world, cfg.n_tool_chat, tool_rng, cfg.tool_no_call_share)
        records["chat"] += [{"id": f"tool-{i:05d}", **t} for i, t in enumerate(chats)]

    # preference --------------------------------------------------------------
    prefs = []
    for q, good in qa[: cfg.n_preference]:
        prefs.append({"prompt": q, "chosen": good, "rejected": _rejected(good, world, rng)})
    items = [dict(p, _tag=None) for p in prefs]
    n_plant = max(2, cfg.n_preference // 50)
    for i in range(n_plant):
        src = rng.randrange(len(prefs))
        items.append(dict(prefs[src], _tag=("exact_dup", src)))
        items.append(dict(prefs[(src + 1) % len(prefs)], rejected=prefs[(src + 1) % len(prefs)]["chosen"], _tag=("junk", "chosen_equals_rejected")))
        item = bench["preference"][i % len(bench["preference"])]
        items.append({"prompt": item["prompt"], "chosen": item["chosen"], "rejected": item["rejected"], "_tag": ("leak", f"preference:{item['id']}")})
    records["preference"], manifest["preference"] = _place(items, rng, "pref", {"junk": {}, "exact_dup": {}, "near_dup": {}, "leak": {}})

    # verifiable --------------------------------------------------------------
    ver, seen = [], set(bench["_arith_questions"])
    while len(ver) < cfg.n_verifiable:
        q, ans, _, _ = arithmetic(rng, SEEN_TEMPLATES)
        if q not in seen and not _near_benchmark(q, bench):
            seen.add(q)
            ver.append({"prompt": q, "answer": str(ans)})
    items = [dict(v, _tag=None) for v in ver]
    n_plant = max(2, cfg.n_verifiable // 50)
    for i in range(n_plant):
        src = rng.randrange(len(ver))
        items.append(dict(ver[src], _tag=("exact_dup", src)))
        items.append({"prompt": ver[src]["prompt"], "answer": "many", "_tag": ("junk", "answer_not_numeric")})
        item = bench["arithmetic"][i % len(bench["arithmetic"])]
        items.append({"prompt": item["question"], "answer": item["answer"], "_tag": ("leak", f"arithmetic:{item['id']}")})
    records["verifiable"], manifest["verifiable"] = _place(items, rng, "ver", {"junk": {}, "exact_dup": {}, "near_dup": {}, "leak": {}})

    # write -------------------------------------------------------------------
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind, rows in records.items():
        write_jsonl(out_dir / f"{kind}.jsonl", rows)
    bdir = out_dir / "benchmarks"
    bdir.mkdir(exist_ok=True)
    for name, rows in bench.items():
        if not name.startswith("_"):
            write_jsonl(bdir / f"{name}.jsonl", rows)
    rag_train, rag_eval = rag_world(cfg)   # its own generator: the rest of the world is unchanged by it
    if rag_train:
        write_jsonl(out_dir / "rag.jsonl", rag_train)
        write_jsonl(bdir / "rag.jsonl", rag_eval)
        records["rag"] = rag_train
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    (out_dir / "world.json").write_text(json.dumps({"facts": world.facts}, indent=1, sort_keys=True))
    return {kind: len(rows) for kind, rows in records.items()} | {
        f"benchmark_{k}": len(v) for k, v in bench.items() if not k.startswith("_")
    }


def _arith_slots(question: str) -> tuple[str, tuple[str, ...]]:
    """(template skeleton, slot values) of an arithmetic question: name, the two numbers, object."""
    words = re.findall(r"\w+", question)
    name = next((w for w in words if w in NAMES), "")  # one unseen template has no name
    obj = next(w for w in words if w in OBJECTS)
    skeleton = " ".join("#" if w.isdigit() else "N" if w == name else "O" if w == obj
                        else "P" if w in ("He", "She") else w for w in words)
    return skeleton, (name, *[w for w in words if w.isdigit()], obj)


def _near_benchmark(question: str, bench: dict) -> bool:
    """True if a benchmark question has the same template and differs in fewer than 2 slots.

    Such a sibling shares >= 50% of its word 8-grams with the benchmark item, which is what
    decontamination flags as a leak; a clean training record must not be one.
    """
    skeleton, slots = _arith_slots(question)
    for other in bench["_arith_slots"].get(skeleton, ()):
        if sum(a != b for a, b in zip(slots, other)) < 2:
            return True
    return False


def _rejected(good: str, world: World, rng: random.Random) -> str:
    # Pairs differ in what should be learned: a wrong fact, or a rambling non-answer.
    if rng.random() < 0.7:
        for v in COLORS + HOMES + FOODS:
            if f" {v}." in good:
                pool = next(p for p in (COLORS, HOMES, FOODS) if v in p)
                return good.replace(f" {v}.", f" {rng.choice([w for w in pool if w != v])}.")
    return "Hmm, that is a hard one. I am not sure, maybe you could ask someone else about it."


def _place(items: list[dict], rng: random.Random, prefix: str, manifest: dict) -> tuple[list[dict], dict]:
    """Shuffle clean records; insert each planted copy *after* its original (dedup keeps the first)."""
    clean = [it for it in items if it["_tag"] is None]
    planted = [it for it in items if it["_tag"] is not None]
    order = list(range(len(clean)))
    rng.shuffle(order)
    rows = [clean[i] for i in order]
    pos_of = {src: pos for pos, src in enumerate(order)}  # clean index → position in rows
    for it in planted:
        tag = it["_tag"]
        lo = pos_of[tag[1]] + 1 if tag[0] in ("exact_dup", "near_dup") else 0
        at = rng.randint(lo, len(rows))
        rows.insert(at, it)
        for k, v in pos_of.items():  # keep positions of originals current
            if v >= at:
                pos_of[k] = v + 1
    out = []
    for i, it in enumerate(rows):
        rid = f"{prefix}-{i:05d}"
        tag = it.pop("_tag")
        it["id"] = rid
        it["_tag"] = tag
        out.append(it)
    id_of_clean = {}
    clean_ids = {id(c) for c in clean}
    for it in out:
        if id(it) in clean_ids:
            id_of_clean[clean.index(it)] = it["id"]
    for it in out:
        tag = it.pop("_tag")
        if tag is None:
            continue
        kind, val = tag
        manifest[kind][it["id"]] = id_of_clean[val] if kind in ("exact_dup", "near_dup") else val
    return [{"id": it["id"], **{k: v for k, v in it.items() if k != "id"}} for it in out], manifest


def _benchmarks(world: World, cfg: GenerateConfig, rng: random.Random) -> dict[str, list[dict]]:
    n = cfg.n_eval
    general_text = [{"id": f"gt-{i:04d}", "text": " ".join(narrative_sentence(rng) for _ in range(5))} for i in range(n)]
    general_mc = []
    for i in range(n):
        s = narrative_sentence(rng).rstrip(".").split(" ")
        cut = max(3, len(s) - 5)
        ctx, tail = " ".join(s[:cut]), s[cut:]
        choices = [" ".join(tail) + "."]
        while len(choices) < 4:
            sh = tail[:]
            rng.shuffle(sh)
            cand = " ".join(sh) + "."
            if cand not in choices:
                choices.append(cand)
        gold = rng.randrange(4)
        choices[0], choices[gold] = choices[gold], choices[0]
        general_mc.append({"id": f"mc-{i:04d}", "context": ctx, "choices": choices, "gold": gold})
    heldout_q = [(q.format(a=a), ANSWER_FORM[k].format(a=a, v=world.facts[a][k]))
                 for (a, k) in world.heldout_pairs for q in QUESTION_FORMS[k]]
    rng.shuffle(heldout_q)
    instruct = [{"id": f"ins-{i:04d}", "question": q, "answer": ans} for i, (q, ans) in enumerate(heldout_q[:n])]
    preference = [{"id": f"pr-{i:04d}", "prompt": q, "chosen": ans, "rejected": _rejected(ans, world, rng)}
                  for i, (q, ans) in enumerate(heldout_q[:n])]

    def arith_set(templates, prefix):
        out, seen = [], set()
        while len(out) < n:
            q, ans, _, _ = arithmetic(rng, templates)
            if q not in seen:
                seen.add(q)
                out.append({"id": f"{prefix}-{len(out):04d}", "question": q, "answer": str(ans)})
        return out

    arith = arith_set(SEEN_TEMPLATES, "ar")
    unseen = arith_set(UNSEEN_TEMPLATES, "au")
    return {
        "general_text": general_text, "general_mc": general_mc, "instruct": instruct,
        "preference": preference, "arithmetic": arith, "arithmetic_unseen": unseen,
        "_arith_questions": {r["question"] for r in arith + unseen},
        "_arith_slots": _slot_index(arith + unseen),
    }


# ---------------------------------------------------------------- open-book facts (the raft step, kind rag)
# People and towns that appear nowhere else in the world: a model can answer questions about them only
# by reading the documents it is given. Each document is one sentence (short prompts for a tiny model).
SYLLABLES = ["ba", "de", "ki", "lo", "mu", "ra", "se", "ti", "vo", "za", "ne", "po", "gu", "fi", "ha", "ju"]
JOBS = ["baker", "farmer", "potter", "sailor", "tailor", "miner", "weaver", "singer", "doctor", "teacher",
        "builder", "hunter"]
RAG_FACTS = {"town": ("{p} lives in {v}.", "Where does {p} live?"),
             "job": ("{p} works as a {v}.", "What is the job of {p}?")}
RAG_DOCS = 7   # documents per record: the oracle and six about other people (the raft step draws 4 of them)


def _rag_names_towns(rng: random.Random) -> tuple[list[str], list[str]]:
    """Every name in rag_world's order (its training people first, then its held-out people) and its 40 towns."""
    names = [a.capitalize() + b + c for a in SYLLABLES for b in SYLLABLES for c in ("n", "k", "r", "l")]
    towns = sorted({(a + b).capitalize() + end for a in SYLLABLES for b in SYLLABLES
                    for end in ("port", "dale", "ford")})
    rng.shuffle(names)
    return names, rng.sample(towns, 40)


def rag_world(cfg: GenerateConfig) -> tuple[list[dict], list[dict]]:
    """Training rag records and the held-out rag eval set (disjoint people), `generate.n_rag` / `n_eval`."""
    if cfg.n_rag == 0:
        return [], []
    rng = random.Random(f"{cfg.seed}:rag")
    names, towns = _rag_names_towns(rng)
    n_train = max(-(-cfg.n_rag // 2), 3 * RAG_DOCS)   # two facts (two records) per person
    n_heldout = max(cfg.n_eval, 3 * RAG_DOCS)   # enough other people to fill every item's documents
    people = names[: n_train + n_heldout]
    facts = {p: {"town": rng.choice(towns), "job": rng.choice(JOBS)} for p in people}

    def records(group: list[str], prefix: str, n: int) -> list[dict]:
        pairs = [(p, k) for p in group for k in RAG_FACTS]
        rng.shuffle(pairs)
        out = []
        for i, (p, k) in enumerate(pairs[:n]):
            answer = facts[p][k]
            others = [o for o in group if o != p and facts[o][k] != answer]
            picked = rng.sample(others, min(len(others), RAG_DOCS - 1))
            docs = [RAG_FACTS[q][0].format(p=o, v=facts[o][q]) for o in picked for q in [rng.choice(list(RAG_FACTS))]]
            docs = [d for d in docs if answer not in d] + [RAG_FACTS[k][0].format(p=p, v=answer)]
            rng.shuffle(docs)
            oracle = next(j for j, d in enumerate(docs) if d.startswith(f"{p} "))
            out.append({"id": f"{prefix}-{i:04d}", "question": RAG_FACTS[k][1].format(p=p), "answer": answer,
                        "documents": docs, "oracle": oracle})
        return out

    return records(people[:n_train], "rag", cfg.n_rag), records(people[n_train:], "rg", cfg.n_eval)


def copy_documents(cfg: GenerateConfig) -> list[dict]:
    """`generate.n_copy_docs` corpus documents about three invented people each (a name, a town, a job bound
    at random for this document alone), who come back again and again: after a name's first mention, its
    later ones, and the town or job said again, can only be predicted by copying from earlier in the text.
    That next-token loss is what grows the copy-from-context (induction) heads a model needs to quote a
    document or repeat a question's argument in a tool call. Names never those of held-out rag people."""
    if cfg.n_copy_docs == 0:
        return []
    names, towns = _rag_names_towns(random.Random(f"{cfg.seed}:rag"))
    n_train = max(-(-cfg.n_rag // 2), 3 * RAG_DOCS) if cfg.n_rag else 0
    held = set(names[n_train: n_train + max(cfg.n_eval, 3 * RAG_DOCS)]) if cfg.n_rag else set()
    pool = [n for n in names if n not in held]
    rng = random.Random(f"{cfg.seed}:copy")
    again = ["Later, {n} went back to {t}.", "{n} is a {j} from {t}.", "Where does {n} live? In {t}.",
             "What is the job of {n}? A {j}.", '{n} wrote "{t}" on a card.', "The {j} {n} walked home to {t}."]
    out = []
    for i in range(cfg.n_copy_docs):
        people = [(n, rng.choice(towns), rng.choice(JOBS)) for n in rng.sample(pool, 3)]
        who = [p[0] for p in people]
        first = [f"{n} lives in {t}." for n, t, _ in people] + [f"{n} works as a {j}." for n, _, j in people]
        first += [narrative_sentence(rng, who) for _ in range(3)]
        rng.shuffle(first)
        second = [narrative_sentence(rng, who) for _ in range(3)]
        second += [rng.choice(again).format(n=n, t=t, j=j) for n, t, j in people]
        rng.shuffle(second)
        out.append({"id": f"copy-{i:05d}", "text": " ".join(first) + "\n\n" + " ".join(second)})
    return out


def _slot_index(items: list[dict]) -> dict[str, list[tuple[str, ...]]]:
    index: dict[str, list[tuple[str, ...]]] = {}
    for r in items:
        skeleton, slots = _arith_slots(r["question"])
        index.setdefault(skeleton, []).append(slots)
    return index


@task(name="generate", retries=1)
def generate_task(cfg: GenerateConfig, out_dir: Path) -> dict:
    """Write the deterministic demo world to data/01_raw."""
    return generate(cfg, out_dir)
