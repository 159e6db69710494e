"""A second world for the tests, made of real English that ships with the installed packages.

Not the demo generator: the corpus is the prose of package READMEs (the long descriptions in
site-packages/*.dist-info/METADATA) and of Python's reference manual (`pydoc_data.topics`), the chats ask what a Python standard-library function does and
answer with the first sentence of its docstring, the preference pairs put that answer against a
word-shuffled copy of it, and the verifiable problems are sums about package names. Held-out sets of
each come from other packages / other modules than the training data (split by name, deterministic),
so every stage is judged on text it never trained on. Same interpreter and lockfile → same world.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

STDLIB = ["json", "os", "os.path", "collections", "itertools", "functools", "re", "string", "textwrap", "shutil",
          "pathlib", "datetime", "random", "statistics", "math", "heapq", "bisect", "csv", "argparse", "logging",
          "subprocess", "threading", "queue", "typing", "dataclasses", "enum", "inspect", "ast", "tokenize",
          "difflib", "zipfile", "tarfile", "gzip", "urllib.parse", "html", "sqlite3", "unittest", "calendar",
          "decimal", "fractions", "operator", "contextlib", "copy", "tempfile", "glob", "fnmatch", "configparser",
          "hashlib", "base64", "binascii", "struct", "codecs", "io", "time", "uuid", "ipaddress", "platform",
          "warnings", "traceback", "weakref", "types", "pprint", "email.utils", "http.cookies", "mimetypes",
          "locale", "gettext", "shlex", "filecmp", "zlib", "bz2", "lzma", "pickletools", "sched", "selectors",
          "socket", "imaplib", "smtplib", "ftplib", "poplib", "xml.dom.minidom", "plistlib", "netrc", "colorsys",
          "wave", "graphlib", "numbers", "cmath", "array", "reprlib", "keyword", "linecache", "tabnanny",
          "py_compile", "compileall", "dis", "symtable", "trace", "timeit", "cProfile", "pstats", "sysconfig"]
WORD = re.compile(r"[A-Za-z]+")


def _heldout(name: str, share: float = 0.15) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16 ** 8 < share


def _prose(par: str) -> bool:
    words = par.split()
    if len(words) < 12 or any(c in par for c in "|`<>{}[]#=*") or "http" in par:
        return False
    return sum(bool(WORD.fullmatch(w.strip(".,;:()'\"!?-"))) for w in words) / len(words) > 0.85


def readme_paragraphs() -> dict[str, list[str]]:
    """package → its README's prose paragraphs (markup, code and tables left out)."""
    site = Path(next(p for p in sys.path if p.endswith("site-packages")))
    out: dict[str, list[str]] = {}
    for meta in sorted(site.glob("*.dist-info/METADATA")):
        text = meta.read_text(errors="replace")
        body = text.split("\n\n", 1)[1] if "\n\n" in text else ""
        body = re.sub(r"```.*?```", "", body, flags=re.S)
        pars = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        pars = [p for p in pars if _prose(p) and p.endswith((".", "!", "?"))]
        if pars:
            out[meta.parent.name.split("-")[0].lower()] = pars
    return out


def reference_paragraphs() -> dict[str, list[str]]:
    """Python's own reference manual (pydoc_data.topics, what `help("topic")` shows): topic → prose paragraphs."""
    from pydoc_data.topics import topics

    out = {}
    for name, text in sorted(topics.items()):
        pars = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
        pars = [p for p in pars if _prose(p) and p.endswith((".", "!", "?"))]
        if pars:
            out[f"topic:{name}"] = pars
    return out


def documents(pars_by_pkg: dict[str, list[str]], min_words: int = 70) -> list[tuple[str, str]]:
    """(package, document): consecutive paragraphs of one README until the document has min_words."""
    docs = []
    for pkg, pars in pars_by_pkg.items():
        cur: list[str] = []
        for p in pars:
            cur.append(p)
            if sum(len(x.split()) for x in cur) >= min_words:
                docs.append((pkg, "\n\n".join(cur)))
                cur = []
    return docs


def function_answers() -> list[tuple[str, str, str]]:
    """(module, qualified function name, first docstring sentence) for documented stdlib functions."""
    out, seen = [], set()
    for mod_name in STDLIB:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, obj in sorted(vars(mod).items()):
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj) or ""
            first = " ".join(doc.split("\n\n", 1)[0].split())
            first = re.split(r"(?<=\.)\s", first, maxsplit=1)[0]
            n = len(first.split())
            if not (4 <= n <= 20) or not first.endswith(".") or not _prose(first + " x x x x x x x x x x x x"):
                continue
            key = f"{mod_name}.{name}"
            if first in seen:
                continue
            seen.add(first)
            out.append((mod_name, key, first))
    return out


QUESTIONS = ["What does {f} do?", "Explain what the function {f} does.", "In one sentence, what is {f} for?"]


def _arith(rng: random.Random, pkgs: list[str]) -> tuple[str, str]:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    p, q = rng.sample(pkgs, 2)
    return (f"The {p} README has {a} sections and the {q} README has {b}. How many sections do they have "
            f"together?", str(a + b))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return str(path)


def build(out: Path, n_docs: int = 300, n_chat: int = 300, n_pref: int = 120, n_ver: int = 150,
          n_eval: int = 30, seed: int = 0) -> dict[str, dict[str, str]]:
    """Write the world under `out`; returns {"sources": {kind: path}, "sets": {kind: path}}."""
    rng = random.Random(seed)
    out = Path(out)
    docs = documents({**readme_paragraphs(), **reference_paragraphs()})
    train_docs = [d for p, d in docs if not _heldout(p, 0.25)]
    test_docs = [d for p, d in docs if _heldout(p, 0.25)]
    rng.shuffle(train_docs)
    rng.shuffle(test_docs)
    fns = function_answers()
    train_fn = [x for x in fns if not _heldout(x[0], 0.2)]
    test_fn = [x for x in fns if _heldout(x[0], 0.2)]
    rng.shuffle(train_fn)
    rng.shuffle(test_fn)
    pkgs = sorted({p for p, _ in docs if not p.startswith("topic:")})

    def chat(q: str, a: str) -> dict:
        return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}

    def shuffled(a: str) -> str:
        w = a.rstrip(".").split()
        for _ in range(5):
            rng.shuffle(w)
            if " ".join(w) != a.rstrip("."):
                break
        return " ".join(w) + "."

    chats = [chat(rng.choice(QUESTIONS).format(f=f), a) for _, f, a in train_fn]
    # a quarter of the chats are the verifiable problems' format, so SFT teaches "The answer is N."
    chats += [chat(q, f"The answer is {a}.") for q, a in (_arith(rng, pkgs) for _ in range(len(chats) // 3))]
    rng.shuffle(chats)
    chats = chats[:n_chat]
    pref_src = train_fn[: n_pref]
    sources = {
        "corpus": _jsonl(out / "src" / "corpus.jsonl", [{"text": d} for d in train_docs[:n_docs]]),
        "chat": _jsonl(out / "src" / "chat.jsonl", chats),
        "preference": _jsonl(out / "src" / "preference.jsonl", [
            {"prompt": rng.choice(QUESTIONS).format(f=f), "chosen": a, "rejected": shuffled(a)} for _, f, a in pref_src]),
        "verifiable": _jsonl(out / "src" / "verifiable.jsonl", [
            {"prompt": q, "answer": a} for q, a in (_arith(rng, pkgs) for _ in range(n_ver))]),
    }
    sets = {
        "text": _jsonl(out / "eval" / "text.jsonl", [{"id": f"t{i}", "text": d} for i, d in enumerate(test_docs[:n_eval])]),
        "qa": _jsonl(out / "eval" / "qa.jsonl", [{"id": f"q{i}", "question": QUESTIONS[0].format(f=f), "answer": a}
                                                 for i, (_, f, a) in enumerate(test_fn[:n_eval])]),
        "pairs": _jsonl(out / "eval" / "pairs.jsonl", [
            {"id": f"p{i}", "prompt": QUESTIONS[0].format(f=f), "chosen": a, "rejected": shuffled(a)}
            for i, (_, f, a) in enumerate(test_fn[:n_eval])]),
        "verifiable": _jsonl(out / "eval" / "verifiable.jsonl", [
            {"id": f"v{i}", "prompt": q, "answer": a} for i, (q, a) in enumerate(_arith(rng, pkgs) for _ in range(n_eval))]),
    }
    return {"sources": sources, "sets": sets}


def params_overrides(world: dict[str, dict[str, str]]) -> list[str]:
    """`--set` overrides that point a workspace at the world: sources plus declared sets and targets."""
    src = "{" + ", ".join(f"{k}: {{path: {p}, kind: {k}}}" for k, p in world["sources"].items()) + "}"
    kinds = {"text": "text", "qa": "qa", "pairs": "pairs", "verifiable": "verifiable"}
    sets = "{" + ", ".join(f"my_{k}: {{path: {p}, kind: {kinds[k]}}}" for k, p in world["sets"].items()) + "}"
    return [f"data.sources={src}", f"evaluate.sets={sets}", "pretrain.target=my_text", "sft.target=my_qa",
            "preference.target=my_pairs", "reasoning.target=my_verifiable", "gate.general=[my_text]"]


TARGETS = {"pretrain": "my_text", "sft": "my_qa", "preference": "my_pairs", "reasoning": "my_verifiable"}


def user_params(params_yaml: Path, world: dict) -> None:
    """What a user edits in params.yaml: sources, declared sets, targets, general metrics (absolute paths)."""
    import yaml

    params = yaml.safe_load(Path(params_yaml).read_text())
    params["data"]["sources"] = {k: {"path": p, "kind": k} for k, p in world["sources"].items()}
    params["evaluate"]["sets"] = {f"my_{k}": {"path": p, "kind": k} for k, p in world["sets"].items()}
    for stage, name in TARGETS.items():
        params[stage]["target"] = name
    params["gate"]["general"] = ["my_text"]
    Path(params_yaml).write_text(yaml.safe_dump(params, sort_keys=False))


if __name__ == "__main__":
    # python tests/realtext_world.py OUT [PARAMS_YAML]: write the world under OUT (and point PARAMS_YAML at it)
    w = build(Path(sys.argv[1]))
    for kind, p in [*w["sources"].items(), *(("set:" + k, v) for k, v in w["sets"].items())]:
        print(kind, sum(1 for _ in open(p)), p)
    if len(sys.argv) > 2:
        user_params(Path(sys.argv[2]), w)
        print("edited", sys.argv[2])
