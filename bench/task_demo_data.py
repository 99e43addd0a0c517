"""Tiny task data for the demo-scale task-specific runs (bench/task_demos.sh), made offline.

The official task-specific runs read google-research `speculative_kd`'s files (GSM8K and
DialogSum subsets), which this machine cannot download. This script makes look-alikes in the
same layouts from templates and a seeded random generator, so that the whole recipe (SFT of
the teacher, CSD, `csd-jax eval --task`) runs end to end on a CPU:

- GSM8K-style word problems with GSM8K-style solutions (`<<a+b=c>>` calculator annotations, the
  answer after `####`): `gsm_train.json` (`{"instances": [{"instruction": "Q: ... \\n\\nA:",
  "response"}]}`, as ddp_csd.py reads it) and `gsm_test.jsonl` (`{"question", "answer"}`, the
  layout of openai/gsm8k that eval_gsm.py reads);
- DialogSum-style two-person dialogues with one-sentence summaries: `summ_train.json`
  (`{"instances": [{"id", "dialogue", "summary", "topic"}]}`) and `summ_test.jsonl`.

    python bench/task_demo_data.py OUT_DIR [--train 256] [--test 32] [--seed 0]

Train and test problems share templates but never a (template, numbers) combination.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
from collections.abc import Callable

NAMES = ("Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kate",
         "Leo", "Mia", "Noah", "Olivia", "Paul")
ITEMS = ("apples", "stickers", "marbles", "books", "pencils", "cookies", "stamps", "shells")


def _add_then_give(rng: random.Random) -> tuple[str, str, int]:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  a, b = rng.randint(5, 60), rng.randint(2, 40)
  c = rng.randint(1, a + b - 1)
  total, left = a + b, a + b - c
  question = (f"{name} has {a} {item}. {name} gets {b} more and then gives {c} away. "
              f"How many {item} does {name} have now?")
  answer = (f"{name} has {a} + {b} = <<{a}+{b}={total}>>{total} {item}.\n"
            f"After giving {c} away, {name} has {total} - {c} = <<{total}-{c}={left}>>{left} "
            f"{item}.\n#### {left}")
  return question, answer, left


def _price_times_count(rng: random.Random) -> tuple[str, str, int]:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  price, count, extra = rng.randint(2, 15), rng.randint(2, 12), rng.randint(1, 20)
  cost = price * count
  total = cost + extra
  question = (f"{name} buys {count} {item} at ${price} each and a bag for ${extra}. "
              "How much does " + name + " spend in total?")
  answer = (f"The {item} cost {count} * {price} = $<<{count}*{price}={cost}>>{cost}.\n"
            f"With the bag, {name} spends {cost} + {extra} = $<<{cost}+{extra}={total}>>"
            f"{total}.\n#### {total}")
  return question, answer, total


def _share_equally(rng: random.Random) -> tuple[str, str, int]:
  name, item = rng.choice(NAMES), rng.choice(ITEMS)
  friends, each = rng.randint(2, 9), rng.randint(2, 15)
  total = friends * each
  question = (f"{name} shares {total} {item} equally among {friends} friends. How many {item} "
              "does each friend get?")
  answer = (f"Each friend gets {total} / {friends} = <<{total}/{friends}={each}>>{each} {item}."
            f"\n#### {each}")
  return question, answer, each


def _pages_per_day(rng: random.Random) -> tuple[str, str, int]:
  name = rng.choice(NAMES)
  per_day, days, already = rng.randint(5, 40), rng.randint(2, 14), rng.randint(0, 50)
  read = per_day * days
  total = read + already
  question = (f"{name} had already read {already} pages of a book. Then {name} reads {per_day} "
              f"pages a day for {days} days. How many pages has {name} read in all?")
  answer = (f"In {days} days {name} reads {per_day} * {days} = <<{per_day}*{days}={read}>>{read} "
            f"pages.\nIn all {name} has read {read} + {already} = <<{read}+{already}={total}>>"
            f"{total} pages.\n#### {total}")
  return question, answer, total


PROBLEMS: tuple[Callable[[random.Random], tuple[str, str, int]], ...] = (
    _add_then_give, _price_times_count, _share_equally, _pages_per_day)

PLANS = (("see a movie", "the cinema", "film"), ("have dinner", "the Italian place", "food"),
         ("take a walk", "the park", "leisure"), ("play tennis", "the club", "sport"),
         ("have coffee", "the cafe near the station", "food"),
         ("hear a concert", "the city hall", "music"))
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
TIMES = ("six", "seven", "eight", "ten", "noon", "five")
# (as #Person2# says it, as the summary says it)
EXCUSES = (("have to work late", "has to work late"), ("am visiting a friend", "is visiting a friend"),
           ("have a doctor's appointment", "has a doctor's appointment"),
           ("am studying for an exam", "is studying for an exam"))


def _dialogue(rng: random.Random, index: int, split: str) -> dict[str, str]:
  activity, place, topic = rng.choice(PLANS)
  first, second = rng.sample(DAYS, 2)
  time, (said, excuse) = rng.choice(TIMES), rng.choice(EXCUSES)
  if rng.random() < 0.5:
    dialogue = (f"#Person1#: Would you like to {activity} on {first}?\n"
                f"#Person2#: Sorry, I can't on {first}, I {said}.\n"
                f"#Person1#: What about {second}?\n"
                f"#Person2#: {second} is fine. Where shall we meet?\n"
                f"#Person1#: At {place}, at {time}.")
    summary = (f"#Person2# {excuse} on {first}, so #Person1# and #Person2# will "
               f"{activity} on {second} and meet at {place} at {time}.")
  else:
    dialogue = (f"#Person1#: I'm going to {place} to {activity} on {first}. Want to come?\n"
                f"#Person2#: Sure. What time?\n"
                f"#Person1#: At {time}.\n"
                f"#Person2#: Great, see you there.")
    summary = (f"#Person1# invites #Person2# to {activity} at {place} on {first} at {time}, "
               "and #Person2# accepts.")
  return {"id": f"{split}_{index}", "dialogue": dialogue, "summary": summary, "topic": topic}


def _gsm(rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, str]]:
  rows = []
  while len(rows) < count:
    question, answer, _ = rng.choice(PROBLEMS)(rng)
    if question not in seen:
      seen.add(question)
      rows.append((question, answer))
  return rows


def _summaries(rng: random.Random, count: int, split: str,
               seen: set[str]) -> list[dict[str, str]]:
  rows = []
  while len(rows) < count:
    row = _dialogue(rng, len(rows), split)
    if row["dialogue"] not in seen:
      seen.add(row["dialogue"])
      rows.append(row)
  return rows


def write(out: pathlib.Path, *, train: int, test: int, seed: int) -> None:
  """Write the four files into `out`."""
  rng = random.Random(seed)
  out.mkdir(parents=True, exist_ok=True)
  seen: set[str] = set()
  gsm_train, gsm_test = _gsm(rng, train, seen), _gsm(rng, test, seen)
  (out / "gsm_train.json").write_text(json.dumps({"instances": [
      {"instruction": f"Q: {q} \n\nA:", "response": a} for q, a in gsm_train]}, indent=1))
  (out / "gsm_test.jsonl").write_text(
      "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in gsm_test))
  seen = set()
  summ_train = _summaries(rng, train, "train", seen)
  summ_test = _summaries(rng, test, "test", seen)
  (out / "summ_train.json").write_text(json.dumps({"instances": summ_train}, indent=1))
  (out / "summ_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in summ_test))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=pathlib.Path)
  parser.add_argument("--train", type=int, default=256)
  parser.add_argument("--test", type=int, default=32)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  write(args.out, train=args.train, test=args.test, seed=args.seed)
  print(f"wrote {args.train} + {args.test} GSM8K-style and DialogSum-style records to {args.out}")


if __name__ == "__main__":
  main()
