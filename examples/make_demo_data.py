"""Write the built-in demo datasets (deterministic; the committed files are this script's output).

    python examples/make_demo_data.py

examples/data/sft_arithmetic.jsonl   instruction/output pairs: short word problems answered step by step,
                                     always ending "The answer is N." (a format the base chat model lacks)
examples/data/grpo_arithmetic.jsonl  instruction/answer pairs for GRPO with the accuracy and format rewards
examples/data/prompts.jsonl          a few prompts for solver_generate.py
examples/data/dpo_arithmetic.jsonl   preference pairs: the worked answer (chosen) against the same steps ending
                                     in a wrong number (rejected), in TRL's three shapes (instruction + strings,
                                     prompt + assistant messages, conversations sharing their user turn)
examples/data/dpo_arithmetic_heldout.jsonl  60 more pairs of the same kind on questions none of the training
                                     pairs ask (the demo's --eval_file)
examples/data/grpo_train.jsonl       the GRPO demo's task: "What is A + B?" for A, B in 1..12, answer A + B;
examples/data/grpo_heldout.jsonl     the held-out split shares no operand pair with the train split (in either
                                     order): HELDOUT_PAIRS of the 78 unordered pairs are kept out of training
"""
import json
import os
import random

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jade", "Kofi", "Lena", "Milo", "Nora"]
THINGS = ["apples", "books", "coins", "pencils", "stamps", "marbles", "cookies", "shells", "cards", "stickers"]


def word_problem(rng: random.Random) -> tuple[str, str, int]:
    """(question, worked answer, numeric answer) for one of four problem shapes."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    kind = rng.randrange(4)
    if kind == 0:
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return q, f"{name} starts with {a} and gets {b} more: {a} + {b} = {a + b}. The answer is {a + b}.", a + b
    if kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} had {a} {thing} and gave away {b}. How many {thing} are left?"
        return q, f"{name} had {a} and gave away {b}: {a} - {b} = {a - b}. The answer is {a - b}.", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {thing} in each box. How many {thing} are there in total?"
        return q, f"{a} boxes of {b} each: {a} x {b} = {a * b}. The answer is {a * b}.", a * b
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    q = f"{name} shares {a * b} {thing} equally among {a} friends. How many {thing} does each friend get?"
    return q, f"{a * b} shared among {a}: {a * b} / {a} = {b}. The answer is {b}.", b


ADD_RANGE = range(1, 13)
HELDOUT_PAIRS = 24
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def addition_splits(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records for the GRPO demo: the unordered operand pairs {A, B} of ADD_RANGE are shuffled
    and split; each train pair appears in both orders, each held-out pair once, in a random order."""
    pairs = [(a, b) for a in ADD_RANGE for b in ADD_RANGE if a <= b]
    rng.shuffle(pairs)
    record = lambda a, b: {"instruction": f"What is {a} + {b}?", "answer": str(a + b)}  # noqa: E731
    heldout = [record(*(p if rng.random() < 0.5 else p[::-1])) for p in pairs[:HELDOUT_PAIRS]]
    train = [record(a, b) for a, b in pairs[HELDOUT_PAIRS:]] + [record(b, a) for a, b in pairs[HELDOUT_PAIRS:] if a != b]
    rng.shuffle(train)
    return train, heldout


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def main(here: str = DATA_DIR):
    """Write every demo file into ``here`` (default examples/data)."""
    os.makedirs(here, exist_ok=True)
    rng = random.Random(2024)
    with open(os.path.join(here, "sft_arithmetic.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(400):
            q, worked, _ = word_problem(rng)
            f.write(json.dumps({"instruction": q, "output": worked}) + "\n")
    with open(os.path.join(here, "grpo_arithmetic.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(200):
            q, _, n = word_problem(rng)
            f.write(json.dumps({"instruction": q + " Put the final number in <answer></answer>.",
                                "answer": str(n)}) + "\n")
    with open(os.path.join(here, "prompts.jsonl"), "w", encoding="utf-8") as f:
        for _ in range(4):
            q, _, n = word_problem(rng)
            f.write(json.dumps({"instruction": q, "answer": str(n)}) + "\n")

    write_dpo(here)

    train, heldout = addition_splits(random.Random(2026))
    write_jsonl(os.path.join(here, "grpo_train.jsonl"), train)
    write_jsonl(os.path.join(here, "grpo_heldout.jsonl"), heldout)


def dpo_record(i: int, rng: random.Random, q: str, worked: str, n: int) -> dict:
    """Pair i: the worked answer against the same steps ending in a wrong number, in shape i % 3."""
    wrong = n + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    bad = worked.replace(f"= {n}. The answer is {n}.", f"= {wrong}. The answer is {wrong}.")
    user = [{"role": "user", "content": q}]
    if i % 3 == 0:
        return {"instruction": q, "chosen": worked, "rejected": bad}
    if i % 3 == 1:
        return {"prompt": user, "chosen": [{"role": "assistant", "content": worked}],
                "rejected": [{"role": "assistant", "content": bad}]}
    return {"chosen": user + [{"role": "assistant", "content": worked}],
            "rejected": user + [{"role": "assistant", "content": bad}]}


def write_dpo(here: str) -> None:
    """dpo_arithmetic.jsonl (300 training pairs) and dpo_arithmetic_heldout.jsonl (60 pairs whose questions are
    none of the training questions, for --eval_file)."""
    rng = random.Random(2025)
    seen = set()
    with open(os.path.join(here, "dpo_arithmetic.jsonl"), "w", encoding="utf-8") as f:
        for i in range(300):
            q, worked, n = word_problem(rng)
            seen.add(q)
            f.write(json.dumps(dpo_record(i, rng, q, worked, n)) + "\n")
    rng, i = random.Random(2026), 0
    with open(os.path.join(here, "dpo_arithmetic_heldout.jsonl"), "w", encoding="utf-8") as f:
        while i < 60:
            q, worked, n = word_problem(rng)
            if q in seen:
                continue
            seen.add(q)
            f.write(json.dumps(dpo_record(i, rng, q, worked, n)) + "\n")
            i += 1


if __name__ == "__main__":
    main()
