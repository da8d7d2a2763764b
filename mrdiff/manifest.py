"""The weights manifest: what every file under models/ is, how it was trained, and which reports use it.

    python -m mrdiff.manifest            # writes models/MANIFEST.json and models/MANIFEST.md
    python -m mrdiff.manifest --check    # exit 2 with one `mrdiff: error: ...` line if files and manifest differ

Layout: models/<recipe>/seed<N>.pt holds the final weights of one fit, models/<recipe>/seed<N>_<steps>.pt an
earlier checkpoint of that fit that a report uses. Each file is an export of `mrdiff evidence export` (a torch.save'd
dict with state_dict, net, module, data, global_step, command, train_seconds). Everything in the manifest is
read from the files themselves (command, steps, training pixels, wall time, the norm_group_channels stamp,
sha256), from git (the commit that added the file and its path then, followed through renames) and from the
reports under results/ whose table.json, table.md or SOURCE.md name the file by its path now or then. The
git fields fall back to the manifest being replaced, so the command can be rerun where history is missing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import subprocess
from pathlib import Path

import torch

from mrdiff.console import error as console_error
from mrdiff.console import info
from mrdiff.evidence.curves import pixels_per_step

LAYOUT = re.compile(r"^models/(?P<recipe>[a-z0-9_]+)/seed(?P<seed>\d+)(?:_(?P<steps>\d+))?\.pt$")
REPORT_FILES = ("table.json", "table.md", "SOURCE.md")  # files of a report folder that name its weights
GIT_FIELDS = ("commit", "former_path", "content_commit")  # from git, else from the manifest being replaced
STAMP = "norm_group_channels"  # set by every U-Net built after the GroupNorm fix (docs/evidence.md: the GroupNorm fix)
COMMAND = "python -m mrdiff.manifest"


class ManifestError(ValueError):
    """The files under models/ and the manifest disagree (or a file does not fit the layout)."""


# -- what one file holds --------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fit_recipe(command: str) -> tuple[list[str], list[str]]:
    """The --config files and the other --key=value overrides of the (first) `mrdiff fit` in a command.

    Stored commands may carry prose after the call ("... (stopped at step 11,000)", "..., then resumed
    with ..."): only the call itself is read. The run directory is where a fit wrote, not how it trained,
    so --trainer.default_root_dir is left out."""
    call = re.split(r"\s\(|,\s*then\b", command, maxsplit=1)[0]
    tokens = shlex.split(call)
    configs, overrides = [], []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == "--config" and i + 1 < len(tokens):
            configs.append(tokens[i + 1])
            i += 2
            continue
        if token.startswith("--config="):
            configs.append(token.split("=", 1)[1])
        elif token.startswith("--") and not token.startswith("--trainer.default_root_dir"):
            overrides.append(token)
        i += 1
    return configs, overrides


def describe(path: Path, root: Path) -> dict:
    """The manifest fields derived from one weights file (no git, no reports)."""
    rel = path.relative_to(root).as_posix()
    match = LAYOUT.match(rel)
    if match is None:
        raise ManifestError(f"{rel} does not fit the layout models/<recipe>/seed<N>.pt or seed<N>_<steps>.pt")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file
        raise ManifestError(f"{rel} cannot be read as a weights export ({type(error).__name__})") from None
    if not isinstance(payload, dict) or not {"net", "data", "global_step", "command"} <= payload.keys():
        raise ManifestError(f"{rel} is not a weights export (needs net, data, global_step, command)")
    steps = int(payload["global_step"])
    if match["steps"] is not None and int(match["steps"]) != steps:
        raise ManifestError(f"{rel} names step {match['steps']} but holds global_step {steps}")
    if int(match["seed"]) != int(payload["data"].get("seed", 0)):
        raise ManifestError(f"{rel} names seed {match['seed']} but was trained with data.seed "
                            f"{payload['data'].get('seed')}")
    configs, overrides = fit_recipe(payload["command"])
    per_step = pixels_per_step(payload["data"])
    init = next((o.split("=", 1)[1] for o in overrides if o.startswith("--model.init_weights=")), None)
    seconds = payload.get("train_seconds")
    return {
        "path": rel, "recipe": match["recipe"], "seed": int(match["seed"]),
        "checkpoint": match["steps"] is not None,
        "configs": configs, "overrides": overrides, "command": payload["command"],
        "init_weights": init, "steps": steps, "pixels_per_step": per_step, "training_pixels": round(steps * per_step),
        "train_seconds": None if seconds is None else round(float(seconds), 1),
        STAMP: payload["net"].get(STAMP), "sha256": sha256(path), "bytes": path.stat().st_size,
    }


# -- git and reports --------------------------------------------------------------------------------------
def git(root: Path, *args: str) -> str | None:
    """stdout of a git command in root; None where there is no git or no repository."""
    try:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def history(rel: str, root: Path) -> dict | None:
    """The commit that added the file and its path then (followed back through renames), and the commit of
    its present bytes (an export can be rewritten in place: the 97-minute pair replaced its 37-minute
    weights at the same path); None without history (not committed yet, or no git)."""
    log = git(root, "log", "--follow", "--name-status", "--format=%x00%H", "--", rel)
    blocks = [b.strip().split("\n") for b in (log or "").split("\x00") if b.strip()]
    changes = [(block[0], line.split("\t")) for block in blocks for line in block[1:] if line.strip()]
    if not changes or changes[-1][1][0] != "A":
        return None
    content = next(commit for commit, fields in changes if fields[0] in ("A", "M") or fields[0] not in ("R100", "C100")
                   and fields[0][0] in "RC")
    return {"commit": changes[-1][0], "former_path": changes[-1][1][1], "content_commit": content}


def predates(report: str, content_commit: str, root: Path, added: dict[str, str | None]) -> bool:
    """Whether a report was committed before the file took its present bytes (so it measured older ones)."""
    if report not in added:  # followed through renames: a report moved to results/archive keeps its date
        table = next(f"{report}/{n}" for n in REPORT_FILES if (root / report / n).is_file())
        log = git(root, "log", "--follow", "--diff-filter=A", "--format=%H", "--", table)
        added[report] = log.split()[-1] if log and log.split() else None
    commit = added[report]
    return (commit is not None and commit != content_commit
            and git(root, "merge-base", "--is-ancestor", commit, content_commit) is not None)


def evaluated(text: str) -> str:
    """The parts of a table.json that say which weights it evaluated: its command and its model paths.

    Not the whole file: its diagnostics copy each model's training command, and a fine-tune's names the
    weights it started from, which the report did not evaluate."""
    try:
        table = json.loads(text)
    except ValueError:
        return text
    meta = table.get("meta") or {}
    return json.dumps([table.get("command"), meta.get("command"), meta.get("models"), meta.get("weights")])


def reports(root: Path) -> dict[str, str]:
    """report folder → the text of its files that name the weights it used (table.json, table.md, SOURCE.md)."""
    texts: dict[str, str] = {}
    results = root / "results"
    for name in REPORT_FILES:
        for path in sorted(results.rglob(name)) if results.is_dir() else ():
            folder = path.parent.relative_to(root).as_posix()
            text = path.read_text(errors="replace")
            texts[folder] = texts.get(folder, "") + "\n" + (evaluated(text) if name == "table.json" else text)
    return texts


# -- the manifest -----------------------------------------------------------------------------------------
def build(root: Path, previous: dict | None = None) -> dict:
    """The manifest of every weights file under root/models."""
    before = {e["path"]: e for e in (previous or {}).get("files", [])}
    entries = [describe(path, root) for path in sorted((root / "models").rglob("*.pt"))]
    texts = reports(root)
    dated: dict[str, str | None] = {}
    for entry in entries:
        found = history(entry["path"], root)
        old = before.get(entry["path"], {})
        entry.update(found or {key: old.get(key) for key in GIT_FIELDS})
        names = {entry["path"], entry.get("former_path")} - {None}
        used = sorted(folder for folder, text in texts.items() if any(n in text for n in names))
        if found is not None:  # leave out reports of the bytes this path held before
            entry["reports"] = [r for r in used if not predates(r, found["content_commit"], root, dated)]
        else:
            entry["reports"] = old.get("reports", used)
    former = {e["former_path"]: e["path"] for e in entries if e.get("former_path")}
    for entry in entries:
        if entry["init_weights"] is not None:
            entry["init_weights"] = former.get(entry["init_weights"], entry["init_weights"])
    return {"written_by": COMMAND, "layout": "models/<recipe>/seed<N>.pt: final weights of a fit; "
                                             "seed<N>_<steps>.pt: an earlier checkpoint of it",
            "files": [order(e) for e in entries]}


FIELDS = ("path", "recipe", "seed", "checkpoint", "steps", "training_pixels", "pixels_per_step", "train_seconds",
          STAMP, "sha256", "bytes", "configs", "overrides", "init_weights", "command", "former_path", "commit",
          "content_commit", "reports")


def order(entry: dict) -> dict:
    return {key: entry.get(key) for key in FIELDS}


def markdown(manifest: dict) -> str:
    """models/MANIFEST.md: the same facts, for reading."""
    files = manifest["files"]
    lines = ["# models/: the shipped weights", "",
             f"Written by `{COMMAND}` from the files, their stored commands, git and the reports under "
             f"results/ (do not edit; `{COMMAND} --check` verifies it). Layout: {manifest['layout']}. Every "
             f"file is fp16 or fp32 EMA weights with the U-Net, module and data settings that rebuild it "
             f"(`torch.load(path, weights_only=False)`; `mrdiff.exported.load`).", "",
             "Training pixels: images seen × pixels per image (steps × the expected pixels of a batch over the "
             "canvas draws); a fine-tune counts its own steps only (its starting weights: `init_weights`).", "",
             "| file | recipe | seed | steps | training pixels (M) | wall time (min) | norm_group_channels "
             "| sha256 | former path | reports |",
             "|---|---|---:|---:|---:|---:|---:|---|---|---|"]
    for e in files:
        minutes = "–" if e["train_seconds"] is None else f"{e['train_seconds'] / 60:.1f}"
        used = ", ".join(f"`{r.removeprefix('results/')}`" for r in e["reports"]) or "–"
        lines.append(f"| `{e['path']}` | {e['recipe']} | {e['seed']} | {e['steps']:,} | "
                     f"{e['training_pixels'] / 1e6:,.0f} | {minutes} | {e[STAMP]} | `{e['sha256'][:12]}` | "
                     f"`{e['former_path'] or '–'}` | {used} |")
    lines += ["", "## How each was trained", ""]
    for e in files:
        recipe = " ".join(f"--config {c}" for c in e["configs"])
        lines += [f"- `{e['path']}`" + (" (an earlier checkpoint of the fit)" if e["checkpoint"] else "")
                  + f": `{recipe}`" + "".join(f" `{o}`" for o in e["overrides"])
                  + (f"; starts from `{e['init_weights']}`" if e["init_weights"] else "")
                  + (f"; added as `{e['former_path']}` in {e['commit'][:7]}" if e["commit"] else ""),
                  "  ```", f"  {e['command']}", "  ```"]
    return "\n".join(lines) + "\n"


def paths(root: Path) -> tuple[Path, Path]:
    return root / "models" / "MANIFEST.json", root / "models" / "MANIFEST.md"


def write(root: Path) -> dict:
    json_path, md_path = paths(root)
    previous = json.loads(json_path.read_text()) if json_path.is_file() else None
    manifest = build(root, previous)
    json_path.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    md_path.write_text(markdown(manifest))
    return manifest


def check(root: Path) -> None:
    """Raise ManifestError at the first way the files under models/ and the manifest differ."""
    json_path, md_path = paths(root)
    try:
        stored = json.loads(json_path.read_text())
        listed = {e["path"]: e for e in stored["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        raise ManifestError(f"{json_path} is missing or unreadable: run `{COMMAND}`") from None
    present = sorted(p.relative_to(root).as_posix() for p in (root / "models").rglob("*.pt"))
    unlisted = [p for p in present if p not in listed]
    if unlisted:
        raise ManifestError(f"{', '.join(unlisted)} not in {json_path.name}: run `{COMMAND}`")
    gone = sorted(set(listed) - set(present))
    if gone:
        raise ManifestError(f"{json_path.name} lists {', '.join(gone)}, which is not under models/")
    for rel in present:
        actual = sha256(root / rel)
        if actual != listed[rel].get("sha256"):
            raise ManifestError(f"{rel} has sha256 {actual[:12]}…, {json_path.name} says "
                                f"{str(listed[rel].get('sha256'))[:12]}…: the file changed")
    fresh = build(root, stored)
    for entry in fresh["files"]:
        if entry[STAMP] is None:
            raise ManifestError(f"{entry['path']} carries no {STAMP} stamp: weights from before the GroupNorm "
                                f"fix (t-blind networks) are not shipped")
    for entry in fresh["files"]:
        differ = [k for k in FIELDS if entry[k] != listed[entry["path"]].get(k)]
        if differ:
            raise ManifestError(f"{json_path.name} is out of date for {entry['path']} ({', '.join(differ)}): "
                                f"run `{COMMAND}`")
    if not md_path.is_file() or md_path.read_text() != markdown(fresh):
        raise ManifestError(f"{md_path.name} does not match {json_path.name}: run `{COMMAND}`")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="verify, write nothing: exit 2 if files and manifest differ")
    p.add_argument("--root", default=".", help="the repository root (models/ and results/ under it)")
    args = p.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        if args.check:
            check(root)
            info(f"mrdiff: {paths(root)[0].relative_to(root)} matches the "
                  f"{sum(1 for _ in (root / 'models').rglob('*.pt'))} weights files under models/")
        else:
            manifest = write(root)
            info(f"mrdiff: wrote models/MANIFEST.json and models/MANIFEST.md ({len(manifest['files'])} files)")
    except ManifestError as error:
        console_error(f"mrdiff: error: {' '.join(str(error).split())}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
