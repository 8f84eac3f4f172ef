"""Score a restoration network the ways its model card reports, and write them into the card.

    python -m models.training.card --task unmask --weights runs/unmask/export/unmask.safetensors
    python -m models.training.card --task unmask --weights W --write      # into W's card (.json + header)
    python -m models.training.card --task restore --quality bench.json    # the output file's figures

Every figure comes from ``models.training.evaluate`` with the network run as the product runs it (unmask:
its mirror self-ensemble; the whole-photo rows run the pipeline, which adds unmask's zooms,
``TaskSpec.zooms``): ``evaluation`` on the pipeline's aligned validation crops,
``evaluation_whole`` on whole photos resized to 128 (the dataset's reference framing) and, for
unmask, ``evaluation_reference_framing`` (our masks on whole photos, the product path end to end),
``evaluation_reference_polygon`` (the dataset's reference mask: a flat lower-face polygon) and ``unmasked_faces`` (clean validation crops in, output against input: what the
network does to a face that wears no mask). ``--write`` merges them into the card beside the
weights and into the card embedded in the safetensors header; the tensors are unchanged.

The card file beside the weights also holds ``FILE_FIELDS``: the sha256 of the .safetensors
file as it is, the weights' ``history`` (``write_card_file``; the training loop appends
one entry per exported run) and ``quality`` (the output file's figures, which move with the
pipeline, not with the weights: ``--quality`` rewrites the card file alone). The header's card
is the same less those.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import data as D
from . import evaluate as E
from .degrade import canonical


# A restoration network's card (``<task>.json`` beside the weights, and the same JSON in the
# weights' header under "card"): these fields, always; optional ones below; nothing else. Every
# figure is a structured field (numbers with their conditions), never prose about how it was
# reached: that belongs in the commit that changed the weights.
CARD_FIELDS = ("task", "weights", "weights_sha256", "format", "architecture", "config", "params",
               "multiple", "data", "training", "validation", "exported", "speed_cpu", "evaluation",
               "history")
CARD_OPTIONAL = ("evaluation_whole", "evaluation_reference_framing", "evaluation_reference_polygon",
                 "evaluation_reference_polygon_fast", "evaluated_as", "unmasked_faces", "quality")
TRAINING_FIELDS = ("steps", "total_steps", "batch", "patch", "train_time_s", "lr", "loss", "ema",
                   "seed", "augment", "degradation", "hardware", "torch", "init")
DATA_FIELDS = ("source", "train_crops", "split", "license")
QUALITY_ROW = ("source", "degradation", "faces", "input", "classical", "facemend", "ceiling")
HISTORY_WORDS = ("session", "previous", "issue", "commit ")  # words of a diary, not of a card
# The card file's own fields, in every ``<name>.json`` beside weights but not in the card in the
# weights' header: the sha256 of the .safetensors file as it is (a file cannot hold its own
# hash); ``quality``, bench/quality.py's rows, which change with the pipeline around the same
# weights; and ``history``: the changes that shipped these weights, oldest first, each
# {date, change, score} (score: the figure that change reached), at most HISTORY_MAX of them.
FILE_FIELDS = ("weights_sha256", "quality", "history")
HISTORY_ENTRY = ("date", "change", "score")
HISTORY_MAX = 6


def check_card(card: dict) -> list[str]:
    """What is wrong with a restoration network's card: missing or unknown fields, a quality
    row without its fields, free text about how the weights came about. Empty when it is right."""
    problems = [f"missing {k}" for k in CARD_FIELDS if k not in card]
    problems += [f"unknown field {k}" for k in card if k not in CARD_FIELDS + CARD_OPTIONAL]
    training, data = card.get("training", {}), card.get("data", {})
    problems += [f"missing training.{k}" for k in TRAINING_FIELDS if k not in training]
    problems += [f"missing data.{k}" for k in DATA_FIELDS if k not in data]
    init = training.get("init")
    if init is not None and not (isinstance(init, dict) and {"weights", "steps"} <= set(init)):
        problems.append("training.init: null or {weights, steps}")
    quality = card.get("quality")
    if quality is not None:
        if not quality.get("command") or not quality.get("rows"):
            problems.append("quality: needs command and rows")
        for row in quality.get("rows", []):
            problems += [f"quality row without {k}" for k in QUALITY_ROW if k not in row]

    problems += check_file_fields(card)

    def texts(d, path=""):
        for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
            if isinstance(v, (dict, list)):
                yield from texts(v, f"{path}{k}.")
            elif isinstance(v, str):
                yield f"{path}{k}", v

    for key, text in texts(card):
        problems += [f"{key}: history ({w.strip()!r}) in a card" for w in HISTORY_WORDS
                     if w in text.lower()]
    return problems


def check_file_fields(card: dict) -> list[str]:
    """What is wrong with a card file's ``weights_sha256`` and ``history`` (any card: restoration
    networks, the VAE, the age judge, the attribute vectors)."""
    problems = []
    sha = card.get("weights_sha256")
    if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        problems.append("weights_sha256: the sha256 of the weights file, 64 hex digits")
    history = card.get("history")
    if not isinstance(history, list) or not 1 <= len(history) <= HISTORY_MAX:
        return problems + [f"history: a list of 1 to {HISTORY_MAX} entries"]
    for i, e in enumerate(history):
        if not isinstance(e, dict) or set(e) != set(HISTORY_ENTRY):
            problems.append(f"history[{i}]: exactly {{{', '.join(HISTORY_ENTRY)}}}")
            continue
        if not (isinstance(e["date"], str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", e["date"])):
            problems.append(f"history[{i}].date: YYYY-MM-DD")
        if not (isinstance(e["change"], str) and 0 < len(e["change"]) <= 100):
            problems.append(f"history[{i}].change: a short line (at most 100 characters)")
        score = e["score"]
        if isinstance(score, bool) or not (isinstance(score, (int, float))
                                           or (isinstance(score, str) and 0 < len(score) <= 60)):
            problems.append(f"history[{i}].score: a number or a short string")
    dates = [e.get("date", "") for e in history if isinstance(e, dict)]
    if dates != sorted(dates):
        problems.append("history: oldest first")
    return problems


def sha256_file(path: Path) -> str:
    """The sha256 (hex) of a file's bytes (``pipeline.weights.hash_file``)."""
    from pipeline.weights import hash_file

    return hash_file(path)


def header_card(card: dict) -> dict:
    """The card as the weights' header holds it: without the card file's own fields."""
    return {k: v for k, v in card.items() if k not in FILE_FIELDS}


def read_card_history(card_path: Path) -> list[dict]:
    """The ``history`` of the card file at ``card_path`` (empty when there is none)."""
    try:
        history = json.loads(Path(card_path).read_text()).get("history")
    except (OSError, ValueError):
        return []
    return list(history) if isinstance(history, list) else []


def file_card(card: dict, weights: Path, history: list[dict]) -> dict:
    """``card`` with the file fields: the sha256 of ``weights`` as it is now, after ``weights``,
    ``card``'s ``quality`` where it has one, and the last ``HISTORY_MAX`` entries of ``history``
    at the end."""
    out = {}
    for k, v in header_card(card).items():
        out[k] = v
        if k == "weights":
            out["weights_sha256"] = sha256_file(weights)
    out.setdefault("weights_sha256", sha256_file(weights))
    if card.get("quality") is not None:
        out["quality"] = card["quality"]
    out["history"] = list(history)[-HISTORY_MAX:]
    return out


def write_card_file(weights: Path, card: dict, history: list[dict], change: str, score) -> Path:
    """Write ``<weights>.json``: ``card`` with the weights' sha256 and ``history`` plus one entry
    for this change (dated today, UTC). Returns the card file's path."""
    entry = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "change": change, "score": score}
    path = Path(weights).with_suffix(".json")
    path.write_text(json.dumps(file_card(card, Path(weights), [*history, entry]), indent=2) + "\n")
    return path


def quality_rows(task: str, bench: dict) -> dict:
    """The card's ``quality`` field from ``bench/quality.py --json`` output: per source and
    degradation, face PSNR of the input, the classical filter, the output file and the network
    alone (dB), with the bench's command."""
    rows = []
    for r in bench.get("rows", []):
        if r.get("task") != task:
            continue
        rows.append({"source": r["source"], "degradation": r["degradation"], "faces": r["input"]["faces"],
                     "input": r["input"]["psnr"], "classical": r["classical"]["psnr"],
                     "classical_filter": r["classical"]["name"], "facemend": r["facemend"]["psnr"],
                     "facemend_ssim": r["facemend"]["ssim"], "flicker": r["facemend"].get("flicker"),
                     "ceiling": (r.get("ceiling") or {}).get("psnr"),
                     # unmask: inside the mask, on its straps (PSNR) and the painted area's sharpness
                     **{k: r[k] for k in ("mask_psnr", "strap_psnr", "sharpness") if k in r}})
    out = {"command": bench.get("command", "python -m bench.quality --json"), "metric": "face PSNR (dB)",
           "rows": rows}
    pooled = [p for p in bench.get("pooled", []) if p.get("task") == task and len(p.get("sources", [])) > 1]
    if pooled:  # every source together, face-weighted: the README's rows
        out["pooled"] = pooled
    return out


def unmasked_faces(model, crops: np.ndarray, tall: np.ndarray | None) -> dict:
    """PSNR of the network's output against its input on clean crops (no mask): 128 px square
    crops, and the product's 128 x 160 crops when ``tall`` is given."""
    out = {"n": int(len(crops)), "psnr": E.scores(E.run_model(model, crops), crops)["psnr"]}
    if tall is not None:
        out["psnr_128x160"] = E.scores(E.run_model(model, tall), tall)["psnr"]
    out["note"] = "clean validation crops in, output vs input"
    return out


def card_scores(task: str, model, limit: int | None = None, clean: int = 200,
                data: Path | None = None) -> dict:
    """The card's evaluation entries for ``model`` (a ``Restorer``), on the validation split
    (or the face photos in ``data``)."""
    task = canonical(task)
    t0 = time.time()
    crops, source = E.crops_from(data, limit)
    r = {"evaluation": {**E.evaluate(task, crops, model=model), "data": source}}
    if task == "unmask":
        r["evaluation_reference_framing"] = E.whole_unmask(data, limit, model=model)
        r["evaluation_reference_polygon"] = E.whole_unmask(data, limit, model=model, mask="reference")
        from ..tasks import resolve

        spec = resolve(task)
        tall, tall_cache = None, D.cache_dir(spec.size + spec.rows_below)  # the product's crop
        if data is None and (tall_cache / "crops.npy").is_file():
            tall = np.ascontiguousarray(D.load_cache("val", tall_cache)[0][:clean])
        r["unmasked_faces"] = unmasked_faces(model, crops[:clean], tall)
    else:
        photos, source = E.whole_photos(data, limit)
        r["evaluation_whole"] = {**E.evaluate(task, photos, model=model), "data": source}
    r["scored_in_s"] = round(time.time() - t0, 1)
    return r


def write_card(weights: Path, scores: dict) -> Path:
    """Merge ``scores`` into the card beside ``weights`` and into its header; returns the card."""
    from ..nets import load_net, read_metadata, save_net

    card_path = weights.with_suffix(".json")
    meta = read_metadata(weights)
    card = json.loads(meta.get("card", "{}"))
    if card_path.is_file():
        card = json.loads(card_path.read_text())
    card.update({k: v for k, v in scores.items() if k != "scored_in_s"})
    if json.loads(meta.get("card", "{}")) != header_card(card):  # else the weights file stays as it is
        net = load_net(weights)
        extra = {k: v for k, v in meta.items() if k not in ("format", "config", "card")}
        save_net(net, weights, metadata={**extra, "card": header_card(card)},
                 fmt=meta.get("format", "facemend-resunet"))
    # the tensors are the same: the history stays, the file's sha256 is the header's
    card_path.write_text(json.dumps(file_card(card, weights, card.get("history", [])), indent=2) + "\n")
    return card_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.training.card", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, help="denoise, enhance (deblur), restore or unmask")
    p.add_argument("--weights", type=Path, default=None,
                   help="a .safetensors file (default: the shipped weights of --task)")
    p.add_argument("--limit", type=int, default=None, help="the first N faces of each set")
    p.add_argument("--write", action="store_true", help="merge the scores into the weights' card")
    p.add_argument("--quality", type=Path, default=None,
                   help="bench/quality.py --json output: write its rows for --task as the card's"
                        " quality field (nothing else is scored)")
    a = p.parse_args(argv)
    from ..nets import load_net
    from ..registry import WEIGHTS_DIR, Restorer
    from ..tasks import resolve

    spec = resolve(canonical(a.task))
    weights = a.weights or WEIGHTS_DIR / (spec.weights or "")
    if weights.suffix != ".safetensors" or not weights.is_file():
        raise SystemExit(f"{weights}: no such .safetensors file")
    if a.quality is not None:
        rows = quality_rows(spec.name, json.loads(a.quality.read_text()))
        if not rows["rows"]:
            raise SystemExit(f"{a.quality}: no rows for task {spec.name}")
        print(f"wrote {write_card(weights, {'quality': rows})}", file=sys.stderr)
        return 0
    if a.write and a.limit:
        raise SystemExit("--write scores the full validation split: leave out --limit")
    model = Restorer(spec, load_net(weights)).eval()  # as the product runs it
    scores = card_scores(spec.name, model, a.limit)
    print(json.dumps(scores))
    if a.write:
        print(f"wrote {write_card(weights, scores)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
