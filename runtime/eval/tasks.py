"""The three evaluations: what is asked per item, what is recorded, and how it is summarised.

verify      FaceRecBench's protocol: the two faces of a pair as two images in one prompt (first
            image, second image, then VERIFY_QUESTION), greedy. Recorded per pair: the answer,
            its parsed yes/no (`parse_yes_no`), and P(yes) / P(no) of the first generated token
            where the backend gives first-token probabilities. Reported, labelled: the decision
            accuracy of the parsed answers (the headline, the figure the papers report; an answer
            with neither word is wrong), then on P(yes) the 10-fold accuracy with a threshold tuned
            on the other folds, EER, TMR at FMR 1e-3 / 1e-4 and the ROC. RFW: per race, and the
            mean and std across races. With an embedding model instead: score = cosine similarity
            of the two embeddings, and the 10-fold accuracy is the headline (insightface's protocol).
mcq         FaceXBench's protocol: the question's images, each as its own image, then the text its
            evaluate.py builds (datasets.facexbench_prompt); greedy, up to 2048 new tokens
            (FaceLLM's setting), stopping at the end of the answer. The option is read from the
            answer at summary time with aggregate_results.py's rule (`facexbench_option`) or
            facert's stricter one (--answer-parser strict), so a finished run can be rescored
            without generating again. Totals by category, sub-category and num_images under
            FaceXBench's names, and the total accuracy as it computes it (correct / questions, over
            every question). OUT/facexbench/ holds the answers in FaceXBench's own results layout.
attributes  each image asked ATTRIBUTES_QUESTION for one token; the attribute head's
            probabilities before (attributes_raw) and after (attributes) the logical-constraint
            step are thresholded at 0.5 and compared with CelebA's labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from runtime.eval.datasets import AttributeImage, MCQuestion
from runtime.eval.metrics import (
    across_groups,
    attribute_accuracy,
    grouped_accuracy,
    plot_roc,
    roc_curve,
    verification_metrics,
)
from runtime.eval.pairs import Pair
from runtime.eval.protocols import ATTRIBUTES_QUESTION, MCQ_MAX_TOKENS, VERIFY_MAX_TOKENS, VERIFY_QUESTION
from runtime.eval.runner import EvalError, ResultsLog, format_table, pct, run_items
from runtime.eval.scoring import ANSWER_PARSERS, cosine, option_parser, parse_yes_no
from runtime.generate import SamplingParams



def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_tokens, temperature=0.0).validate()


def _ok(items: list, records: dict[str, dict]) -> list[dict]:
    return [records[it.id] for it in items if it.id in records and "error" not in records[it.id]]


def _errors(items: list, records: dict[str, dict]) -> int:
    return sum(1 for it in items if "error" in records.get(it.id, {}))


# ------------------------------------------------------------------------------------ verify

def run_verify(pairs: list[Pair], log: ResultsLog, *, backend=None, embedder=None, question: str = VERIFY_QUESTION,
               max_tokens: int = VERIFY_MAX_TOKENS, batch_size: int = 8, title: str = "verify") -> tuple[dict, str]:
    if (backend is None) == (embedder is None):
        raise ValueError("verify scores with exactly one of an MLLM backend or an embedding model")
    if backend is not None:
        params = greedy(max_tokens)

        def score(group: list[Pair]) -> list[dict]:
            answers = backend.answer([p.images() for p in group], [question] * len(group), params, yes_no=True)
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


def _pair_set_metrics(pairs: list[Pair], records: dict[str, dict], embedding: bool) -> tuple[dict, np.ndarray | None]:
    """Metrics of one pair set (all pairs, or one RFW race) and its scores (None without them)."""
    scored = [p for p in pairs if p.id in records and "error" not in records[p.id]]
    recs = [records[p.id] for p in scored]
    labels = np.array([p.issame for p in scored], dtype=bool)
    folds = [p.fold for p in scored] if scored and all(p.fold is not None for p in scored) else None
    if embedding:
        scores, decisions = np.array([r["score"] for r in recs]), None
    else:
        decisions = [r["decision"] for r in recs]
        scores = np.array([r["p_yes"] for r in recs]) if recs and all("p_yes" in r for r in recs) else None
    m = verification_metrics(labels, scores, decisions, folds)
    m["errors"] = sum(1 for p in pairs if "error" in records.get(p.id, {}))
    m["unscored"] = sum(1 for p in pairs if p.id not in records)
    return m, (scores if scores is not None and 0 < labels.sum() < labels.size else None)


def summarize_verify(pairs: list[Pair], records: dict[str, dict], log: ResultsLog, embedding: bool,
                     title: str) -> tuple[dict, str]:
    groups: dict[str | None, list[Pair]] = {}
    for p in pairs:
        groups.setdefault(p.group, []).append(p)
    ok = _ok(pairs, records)
    if embedding:
        score = "cosine similarity of face embeddings"
    else:  # a server that returns no first-token probabilities leaves the P(yes) figures out
        score = "first-token P(yes)" if ok and all("p_yes" in r for r in ok) else None
    summary: dict = {"task": "verify", "title": title, "items": len(pairs), "scored": len(ok),
                     "errors": _errors(pairs, records), "score": score,
                     "decision": None if embedding else "the parsed yes/no answer; neither counts as wrong"}
    per_group, curves = {}, {}
    for name, members in groups.items():
        m, scores = _pair_set_metrics(members, records, embedding)
        per_group[name or title] = m
        if scores is not None:
            scored = [p for p in members if p.id in records and "error" not in records[p.id]]
            fmr, tmr, _ = roc_curve(scores, [p.issame for p in scored])
            curves[name or title] = (fmr, tmr)
    figures = ("decision_accuracy", "threshold_ten_fold.mean", "eer.eer")
    if None in groups:
        summary["metrics"] = per_group[title]
    else:
        summary["groups"] = per_group
        summary["across_groups"] = across_groups(per_group, figures)
    if curves:
        try:
            path = log.dir / "roc.png"
            plot_roc(curves, path, f"ROC: {title} ({'cosine' if embedding else 'P(yes)'})")
            summary["roc_png"] = str(path)
        except ImportError:
            summary["roc_png"] = None
    return summary, _verify_table(summary, embedding, title)


def _tmr_cell(m: dict, key: str) -> str:
    t = (m.get("tmr_at_fmr") or {}).get(key)
    if t is None:
        return "n/a"
    return pct(t["tmr"]) + ("" if t["resolvable"] else f" (FMR = 0 bound: {m['different']} different pairs)")


def _verify_table(summary: dict, embedding: bool, title: str) -> str:
    score = "cosine" if embedding else "P(yes)"
    threshold_label = (f"10-fold accuracy, threshold tuned on {score}" +
                       ("" if embedding else " (not comparable with the papers)"))
    if "metrics" in summary:
        m = summary["metrics"]
        rows = [("pairs scored (same / different)", f"{m['pairs']} ({m['same']} / {m['different']})"),
                ("errors (not scored)", m["errors"])]
        if not embedding:
            folds = m.get("decision_folds")
            rows += [("decision accuracy: parsed yes/no answer (headline, as the papers report)",
                      pct(m["decision_accuracy"])),
                     ("  the same, mean ± std over the folds",
                      f"{pct(folds['mean'])} ± {pct(folds['std'])}" if folds else "n/a"),
                     ("  answers with neither yes nor no (counted wrong)", m["answers_neither"])]
        t = m.get("threshold_ten_fold")
        rows.append((threshold_label, f"{pct(t['mean'])} ± {pct(t['std'])}" if t else "n/a"))
        rows.append((f"EER on {score}", pct(m["eer"]["eer"]) if m.get("eer") else "n/a"))
        for key in ("0.001", "0.0001"):
            rows.append((f"TMR @ FMR {key} on {score}", _tmr_cell(m, key)))
        rows.append(("ROC plot", summary.get("roc_png") or "n/a"))
        text = format_table(title, ("metric", "value"), rows)
        notes = m["notes"]
    else:
        header = ("group", "pairs", "decision accuracy (headline)", threshold_label, f"EER on {score}")
        if embedding:
            header = ("group", "pairs", threshold_label + " (headline)", f"EER on {score}")
        rows, notes = [], []
        for name, m in summary["groups"].items():
            t = m.get("threshold_ten_fold")
            cells = [pct(t["mean"]) if t else "n/a", pct(m["eer"]["eer"]) if m.get("eer") else "n/a"]
            if not embedding:
                cells.insert(0, pct(m["decision_accuracy"]))
            rows.append((name, m["pairs"], *cells))
            notes += [f"{name}: {n}" for n in m["notes"]]
        across = summary["across_groups"]

        def cell(key):
            a = across[key]
            return f"{pct(a['mean'])} ± {pct(a['std'])}" if a else "n/a"

        cells = [cell("threshold_ten_fold.mean"), cell("eer.eer")]
        if not embedding:
            cells.insert(0, cell("decision_accuracy"))
        rows.append(("mean ± std across groups", summary["scored"], *cells))
        text = format_table(title, header, rows)
        text += f"\nerrors (not scored): {summary['errors']}; ROC plot: {summary.get('roc_png') or 'n/a'}"
    if notes:
        text += "\n" + "\n".join(f"note: {n}" for n in dict.fromkeys(notes))
    return text


# --------------------------------------------------------------------------------------- mcq

def run_mcq(questions: list[MCQuestion], log: ResultsLog, backend, max_tokens: int = MCQ_MAX_TOKENS,
            answer_parser: str = "facexbench", title: str = "mcq") -> tuple[dict, str]:
    option_parser(answer_parser)  # refuse an unknown parser before generating anything
    params = greedy(max_tokens)

    def score(group: list[MCQuestion]) -> list[dict]:
        images = [[Path(p).read_bytes() for p in q.images] for q in group]
        answers = backend.answer(images, [q.prompt for q in group], params)
        return [{"id": q.id, "text": a["text"]} for q, a in zip(group, answers)]

    records = run_items(questions, score, log, backend.batch_size, backend.workers, title)
    summary, text = summarize_mcq(questions, records, answer_parser, title)
    write_facexbench_results(questions, records, log.dir / "facexbench")
    return summary, text


def _tally(rows: list[dict], key: str) -> dict[str, dict]:
    return {g: {**c, "accuracy": 100.0 * c["accuracy"]} for g, c in grouped_accuracy(rows, key).items()}


def summarize_mcq(questions: list[MCQuestion], records: dict[str, dict], answer_parser: str = "facexbench",
                  title: str = "mcq") -> tuple[dict, str]:
    """Totals as aggregate_results.py counts them: every question counts, and one with no answer
    (not run, or refused) is wrong; accuracies in percent."""
    rows = []
    for q in questions:
        rec = records.get(q.id, {})
        text = rec.get("text") if "error" not in rec else None
        predicted = option_parser(answer_parser)(text, q.options) if text is not None else None
        other = [p for p in ANSWER_PARSERS if p != answer_parser][0]
        rows.append({"category": q.category, "sub-category": q.subtask, "num_images": q.num_images,
                     "correct": predicted == q.answer, "answered": text is not None,
                     "parsed": predicted is not None,
                     "correct_other": text is not None and option_parser(other)(text, q.options) == q.answer})
    correct = sum(r["correct"] for r in rows)
    summary = {"task": "mcq", "title": title, "answer_parser": answer_parser,
               "answer_extraction": ("FaceXBench's aggregate_results.py rule" if answer_parser == "facexbench"
                                     else "facert's strict parser"),
               "questions": len(rows), "answered": sum(r["answered"] for r in rows),
               "errors": _errors(questions, records),
               "unparsed_answers": sum(r["answered"] and not r["parsed"] for r in rows),
               "total": {"correct": correct, "total": len(rows), "accuracy": 100.0 * correct / len(rows) if rows else 0.0},
               "category": _tally(rows, "category"),
               "sub-category": _tally(rows, "sub-category"),
               "num_images": _tally(rows, "num_images")}
    other = [p for p in ANSWER_PARSERS if p != answer_parser][0]
    other_correct = sum(r["correct_other"] for r in rows)
    summary["total_with_other_parser"] = {"answer_parser": other, "correct": other_correct,
                                          "accuracy": 100.0 * other_correct / len(rows) if rows else 0.0}
    return summary, _mcq_text(summary, title)


def _mcq_text(s: dict, title: str) -> str:
    """The summary in the layout of aggregate_results.py's results.txt."""
    t = s["total"]
    lines = [f"{title} | Total Questions: {t['total']} | answers read with {s['answer_extraction']}",
             f"Total Accuracy: {t['accuracy']:.2f}% ({t['correct']}/{t['total']})"]
    for heading, key in (("Category Accuracies", "category"), ("Sub-category Accuracies", "sub-category"),
                         ("Number of Images Accuracies", "num_images")):
        lines += ["", f"{heading}:"]
        lines += [f"{g}: {c['accuracy']:.2f}% ({c['correct']}/{c['total']})" for g, c in s[key].items()]
    o = s["total_with_other_parser"]
    lines += ["", f"answered: {s['answered']} of {s['questions']}; errors: {s['errors']}; answers with no option "
                  f"found: {s['unparsed_answers']}; total with the {o['answer_parser']} parser instead: "
                  f"{o['accuracy']:.2f}% ({o['correct']}/{t['total']})"]
    return "\n".join(lines)


def write_facexbench_results(questions: list[MCQuestion], records: dict[str, dict], out: Path) -> None:
    """Each question file as FaceXBench's evaluate.py writes its results (the file with a
    `prediction`, the stripped answer, per question), so its aggregate_results.py can be run on
    OUT/facexbench/ as a cross-check. Questions without an answer get an empty prediction."""
    by_file: dict[Path, list[MCQuestion]] = {}
    for q in questions:
        by_file.setdefault(q.source, []).append(q)
    out.mkdir(parents=True, exist_ok=True)
    for source, qs in by_file.items():
        data = json.loads(source.read_text())
        for q in qs:
            rec = records.get(q.id, {})
            data["questions"][q.id.split("/", 1)[1]]["prediction"] = (rec.get("text") or "").strip() \
                if "error" not in rec else ""
        (out / source.name).write_text(json.dumps(data, indent=4) + "\n")


# -------------------------------------------------------------------------------- attributes

def run_attributes(images: list[AttributeImage], names: list[str], log: ResultsLog, backend,
                   title: str = "attributes", split: str = "all") -> tuple[dict, str]:
    if backend.has_attributes is False:
        raise EvalError(f"the attributes evaluation needs FaceInsight's attribute head; this model "
                        f"({backend.family}) has none")
    params = greedy(1)

    def score(group: list[AttributeImage]) -> list[dict]:
        answers = backend.answer([[a.path.read_bytes()] for a in group], [ATTRIBUTES_QUESTION] * len(group), params)
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
    return summarize_attributes(images, names, records, title, split)


def summarize_attributes(images: list[AttributeImage], names: list[str], records: dict[str, dict],
                         title: str, split: str = "all") -> tuple[dict, str]:
    ok = _ok(images, records)
    summary: dict = {"task": "attributes", "title": title, "split": split, "items": len(images), "scored": len(ok),
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
    text = format_table(f"{title} ({split} split, {len(ok)} images; attributes whose accuracy the constraint step "
                        "changed, then the mean)", ("attribute", "before constraints", "after constraints"), rows)
    text += f"\nimages where a constraint rule fired: {summary['images_with_rules_fired']}; errors: {summary['errors']}"
    return summary, text
