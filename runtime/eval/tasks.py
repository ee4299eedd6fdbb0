"""The three evaluations: what is asked per item, what is recorded, and how it is summarised.

verify      both faces side by side in one image (`datasets.composite`), VERIFY_QUESTION asked,
            greedy; score = first-token P(yes), decision = the yes/no parsed from the text (an
            answer with neither word counts as "no"). Where the backend gives no first-token
            probabilities (a server that does not return them) the score falls back to the
            decision (yes 1, no 0, neither 0.5) and the summary says so. With an embedding model
            instead: score = cosine similarity of the two embeddings.
mcq         FaceXBench's prompt (datasets.facexbench_prompt) with the question's image; several
            images become one numbered grid and the prompt starts with MULTI_IMAGE_NOTE; the
            option letter is extracted from the free-text answer.
attributes  each image asked ATTRIBUTES_QUESTION for one token; the attribute head's
            probabilities before (attributes_raw) and after (attributes) the logical-constraint
            step are thresholded at 0.5 and compared with CelebA's labels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.eval.datasets import COMPOSITE_FILL, COMPOSITE_TILE, AttributeImage, MCQuestion, Pair, composite
from runtime.eval.metrics import attribute_accuracy, grouped_accuracy, plot_roc, roc_curve, verification_metrics
from runtime.eval.runner import EvalError, ResultsLog, format_table, pct, run_items
from runtime.eval.scoring import cosine, extract_option_letter, parse_yes_no
from runtime.generate import SamplingParams

VERIFY_QUESTION = ("The image shows two face photos side by side. "
                   "Are these two face images of the same person? Answer yes or no.")
MULTI_IMAGE_NOTE = "The image shows {n} pictures in a grid, numbered 1 to {n} in their top-left corners.\n"
ATTRIBUTES_QUESTION = "Describe this person's face."


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0).validate()


def _ok(items: list, records: dict[str, dict]) -> list[dict]:
    return [records[it.id] for it in items if it.id in records and "error" not in records[it.id]]


def _errors(items: list, records: dict[str, dict]) -> int:
    return sum(1 for it in items if "error" in records.get(it.id, {}))


# ------------------------------------------------------------------------------------ verify

def run_verify(pairs: list[Pair], log: ResultsLog, *, backend=None, embedder=None, question: str = VERIFY_QUESTION,
               max_tokens: int = 8, batch_size: int = 8, title: str = "verify") -> tuple[dict, str]:
    if (backend is None) == (embedder is None):
        raise ValueError("verify scores with exactly one of an MLLM backend or an embedding model")
    if backend is not None:
        params = greedy(max_tokens)

        def score(group: list[Pair]) -> list[dict]:
            images = [composite(list(p.images())) for p in group]
            answers = backend.answer(images, [question] * len(group), params, yes_no=True)
            out = []
            for p, a in zip(group, answers):
                r = {"id": p.id, "issame": p.issame, "text": a["text"], "decision": parse_yes_no(a["text"])}
                if "p_yes" in a:
                    r["p_yes"], r["p_no"] = a["p_yes"], a["p_no"]
                out.append(r)
            return out

        records = run_items(pairs, score, log, backend.batch_size, backend.workers, title)
    else:
        def score(group: list[Pair]) -> list[dict]:
            emb = embedder.embed([im for p in group for im in p.images()])
            sims = cosine(emb[0::2], emb[1::2])
            return [{"id": p.id, "issame": p.issame, "score": float(s)} for p, s in zip(group, sims)]

        records = run_items(pairs, score, log, batch_size, 1, title)
    return summarize_verify(pairs, records, log, embedding=embedder is not None, title=title)


def summarize_verify(pairs: list[Pair], records: dict[str, dict], log: ResultsLog, embedding: bool,
                     title: str) -> tuple[dict, str]:
    ok = _ok(pairs, records)
    summary: dict = {"task": "verify", "title": title, "items": len(pairs), "scored": len(ok),
                     "errors": _errors(pairs, records)}
    if not ok:
        summary["metrics"] = None
        return summary, format_table(title, ("metric", "value"), [("pairs scored", 0)])
    labels = np.array([r["issame"] for r in ok], dtype=bool)
    decisions = None
    if embedding:
        scores = np.array([r["score"] for r in ok])
        summary["score"] = "cosine similarity of face embeddings"
    else:
        decisions = np.array([1.0 if r["decision"] is True else 0.0 for r in ok])
        summary["unparsed_answers"] = sum(1 for r in ok if r["decision"] is None)
        if all("p_yes" in r for r in ok):
            scores = np.array([r["p_yes"] for r in ok])
            summary["score"] = "first-token P(yes)"
        else:
            scores = np.array([{True: 1.0, False: 0.0, None: 0.5}[r["decision"]] for r in ok])
            summary["score"] = ("parsed yes/no answer (1 / 0, 0.5 for neither): the backend returned no "
                                "first-token probabilities, so the ROC has at most three points")
    m = verification_metrics(scores, labels, decisions)
    summary["metrics"] = m
    rows = [("pairs scored (same / different)", f"{m['pairs']} ({m['same']} / {m['different']})"),
            ("errors", summary["errors"]), ("score", summary["score"].split(":")[0])]
    if m["ten_fold"]:
        rows.append(("10-fold accuracy (mean ± std)", f"{pct(m['ten_fold']['mean'])} ± {pct(m['ten_fold']['std'])}"))
    if decisions is not None:
        rows.append(("yes/no decision accuracy", pct(m["decision_accuracy"])))
        rows.append(("answers with neither yes nor no", summary["unparsed_answers"]))
    if m["eer"]:
        rows.append(("EER", pct(m["eer"]["eer"])))
        for key, t in m["tmr_at_fmr"].items():
            note = "" if t["resolvable"] else f" (only {m['different']} different pairs: FMR = 0 bound)"
            rows.append((f"TMR @ FMR {key}", pct(t["tmr"]) + note))
        fmr, tmr, _ = roc_curve(scores, labels)
        try:
            path = log.dir / "roc.png"
            plot_roc({title: (fmr, tmr)}, path, f"ROC: {title}")
            summary["roc_png"] = str(path)
            rows.append(("ROC plot", str(path)))
        except ImportError:
            rows.append(("ROC plot", "skipped: matplotlib is not installed"))
    else:
        rows.append(("EER / TMR", m["note"]))
    return summary, format_table(title, ("metric", "value"), rows)


# --------------------------------------------------------------------------------------- mcq

def _blank_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (COMPOSITE_TILE, COMPOSITE_TILE), COMPOSITE_FILL).save(buf, format="PNG")
    return buf.getvalue()


def mcq_request(q: MCQuestion) -> tuple[bytes, str]:
    """The one image and the text asked for a question (see the module docstring)."""
    raw = [Path(p).read_bytes() for p in q.images]
    if not raw:  # the models need an image; FaceXBench questions always have one
        return _blank_png(), q.prompt
    if len(raw) == 1:
        return raw[0], q.prompt
    return composite(raw, numbered=True), MULTI_IMAGE_NOTE.format(n=len(raw)) + q.prompt


def run_mcq(questions: list[MCQuestion], log: ResultsLog, backend, max_tokens: int = 32,
            title: str = "mcq") -> tuple[dict, str]:
    params = greedy(max_tokens)

    def score(group: list[MCQuestion]) -> list[dict]:
        requests = [mcq_request(q) for q in group]
        answers = backend.answer([r[0] for r in requests], [r[1] for r in requests], params)
        out = []
        for q, a in zip(group, answers):
            letter = extract_option_letter(a["text"], q.options)
            out.append({"id": q.id, "category": q.category, "subtask": q.subtask, "num_images": q.num_images,
                        "answer": q.answer, "text": a["text"], "predicted": letter, "correct": letter == q.answer})
        return out

    records = run_items(questions, score, log, backend.batch_size, backend.workers, title)
    return summarize_mcq(questions, records, title)


def summarize_mcq(questions: list[MCQuestion], records: dict[str, dict], title: str) -> tuple[dict, str]:
    # Every question with a record counts; one that failed (its image or prompt was refused) is wrong.
    rows = [{"category": q.category, "subtask": q.subtask, "num_images": q.num_images,
             "correct": bool(records[q.id].get("correct"))} for q in questions if q.id in records]
    ok = _ok(questions, records)
    summary = {"task": "mcq", "title": title, "items": len(questions), "scored": len(rows),
               "errors": _errors(questions, records),
               "unparsed_answers": sum(1 for r in ok if r["predicted"] is None),
               "overall": grouped_accuracy([{**r, "all": "overall"} for r in rows], "all").get("overall"),
               "by_category": grouped_accuracy(rows, "category"),
               "by_subtask": grouped_accuracy(rows, "subtask"),
               "by_num_images": grouped_accuracy(rows, "num_images")}
    table_rows = []
    for label, key in (("category", "by_category"), ("subtask", "by_subtask")):
        for group, c in summary[key].items():
            table_rows.append((f"{label}: {group}", c["correct"], c["total"], pct(c["accuracy"])))
    o = summary["overall"] or {"correct": 0, "total": 0, "accuracy": None}
    table_rows.append(("overall", o["correct"], o["total"], pct(o["accuracy"])))
    text = format_table(title, ("group", "correct", "total", "accuracy"), table_rows)
    text += (f"\nanswers with no option letter found: {summary['unparsed_answers']}; "
             f"errors: {summary['errors']}")
    return summary, text


# -------------------------------------------------------------------------------- attributes

def run_attributes(images: list[AttributeImage], names: list[str], log: ResultsLog, backend,
                   title: str = "attributes") -> tuple[dict, str]:
    if backend.has_attributes is False:
        raise EvalError(f"the attributes evaluation needs FaceInsight's attribute head; this model "
                        f"({backend.family}) has none")
    params = greedy(1)

    def score(group: list[AttributeImage]) -> list[dict]:
        answers = backend.answer([a.path.read_bytes() for a in group], [ATTRIBUTES_QUESTION] * len(group), params)
        out = []
        for item, a in zip(group, answers):
            if not a.get("attributes") or not a.get("attributes_raw"):
                raise EvalError("the model returned no facial attributes: the attributes evaluation needs "
                                "FaceInsight's attribute head (FaceLLM has none)")
            out.append({"id": item.id, "labels": [item.labels[n] for n in names],
                        "raw": [a["attributes_raw"][n] for n in names],
                        "constrained": [a["attributes"][n] for n in names],
                        "fired": a.get("constraints_fired") or []})
        return out

    records = run_items(images, score, log, backend.batch_size, backend.workers, title)
    return summarize_attributes(images, names, records, title)


def summarize_attributes(images: list[AttributeImage], names: list[str], records: dict[str, dict],
                         title: str) -> tuple[dict, str]:
    ok = _ok(images, records)
    summary: dict = {"task": "attributes", "title": title, "items": len(images), "scored": len(ok),
                     "errors": _errors(images, records), "attributes": names}
    if not ok:
        summary["before_constraints"] = summary["after_constraints"] = None
        return summary, format_table(title, ("metric", "value"), [("images scored", 0)])
    labels = np.array([r["labels"] for r in ok])
    before = attribute_accuracy(labels, np.array([r["raw"] for r in ok]), names)
    after = attribute_accuracy(labels, np.array([r["constrained"] for r in ok]), names)
    summary["before_constraints"], summary["after_constraints"] = before, after
    summary["images_with_rules_fired"] = sum(1 for r in ok if r["fired"])
    rows = [(n, pct(before["per_attribute"][n]), pct(after["per_attribute"][n])) for n in names
            if before["per_attribute"][n] != after["per_attribute"][n]]
    rows.append((f"mean over {len(names)} attributes", pct(before["mean"]), pct(after["mean"])))
    text = format_table(f"{title} ({len(ok)} images; attributes whose accuracy the constraint step changed, then the mean)",
                        ("attribute", "before constraints", "after constraints"), rows)
    text += f"\nimages where a constraint rule fired: {summary['images_with_rules_fired']}; errors: {summary['errors']}"
    return summary, text
