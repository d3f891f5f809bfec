"""`osediff comfyui install [COMFYUI_DIR]`: osediff into ComfyUI's Python, the node pack into its custom_nodes/.

ComfyUI runs custom nodes in its own Python (a venv beside it, the portable build's `python_embeded`, or
whatever started `main.py`), so osediff has to be installed there, not where this command runs. The pack
folder (`comfyui/` of a checkout) is linked into `custom_nodes/` (copied where links are not possible, or
with `--copy`), under a name other than `osediff`, so that no tool that puts custom_nodes/ on sys.path can
shadow the library with the pack.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

HELP = "install osediff and its node pack into a ComfyUI (finds ComfyUI's Python; --dry-run shows the steps)"
DEFAULT_NAME = "ComfyUI-OSEDiff"

log = logging.getLogger("osediff.comfyui")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("install", help="install into a ComfyUI", description=__doc__.splitlines()[0])
    i.add_argument("comfyui_dir", nargs="?", default=".",
                   help="the ComfyUI folder (holding main.py), or a portable build's folder above it "
                        "(default: the current folder)")
    i.add_argument("--python", help="ComfyUI's Python (default: its venv/.venv, or the portable python_embeded)")
    i.add_argument("--name", default=DEFAULT_NAME, help="folder name in custom_nodes/ (default: %(default)s)")
    i.add_argument("--copy", action="store_true", help="copy the pack instead of linking it (a link follows the "
                                                       "checkout: edits and `git pull` apply after a restart)")
    i.add_argument("--pack", help="the node pack folder (default: comfyui/ of this osediff checkout)")
    i.add_argument("--force", action="store_true", help="replace an existing custom_nodes/NAME")
    i.add_argument("--dry-run", action="store_true", help="print the steps without doing them")


@dataclass(frozen=True)
class Plan:
    """What `install` does: the pip command in ComfyUI's Python, and the pack placed at `target`."""

    comfyui: Path
    python: Path
    pip: tuple[str, ...]
    pack: Path
    target: Path
    copy: bool
    replace: bool

    def lines(self) -> list[str]:
        how = "copy" if self.copy else "link"
        out = [f"ComfyUI:        {self.comfyui}", f"its Python:     {self.python}",
               f"install osediff: {' '.join(self.pip)}"]
        if self.replace:
            out.append(f"remove:         {self.target}")
        out.append(f"{how} the pack:  {self.target} -> {self.pack}" if not self.copy
                   else f"{how} the pack:  {self.pack} -> {self.target}")
        return out


class InstallError(RuntimeError):
    """A ComfyUI, its Python or the pack was not found, or the target is taken: one line for the user."""


# --- finding things -------------------------------------------------------------------------------------------
def find_comfyui(folder: Path) -> Path:
    """The ComfyUI folder: `folder` itself when it holds main.py and custom_nodes/, else its ComfyUI/ (the
    portable build's layout)."""
    for cand in (folder, folder / "ComfyUI"):
        if (cand / "main.py").is_file() and (cand / "custom_nodes").is_dir():
            return cand.resolve()
    raise InstallError(f"{folder}: not a ComfyUI folder (no main.py and custom_nodes/ in it or in ComfyUI/ below)")


def python_candidates(comfyui: Path) -> list[Path]:
    """Where ComfyUI's Python usually is, in the order tried: a venv inside or beside it, then the portable
    build's python_embeded (beside ComfyUI/)."""
    found = []
    for venv in (comfyui / "venv", comfyui / ".venv", comfyui.parent / "venv", comfyui.parent / ".venv"):
        found += [venv / "bin" / "python", venv / "Scripts" / "python.exe"]
    for embeded in (comfyui.parent / "python_embeded", comfyui / "python_embeded"):
        found += [embeded / "python.exe", embeded / "python"]
    return found


def find_python(comfyui: Path, given: str | None) -> Path:
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise InstallError(f"--python {given}: no such file")
        return p.absolute()  # not resolved: a venv's python is a link, and the link is what makes it that venv
    for p in python_candidates(comfyui):
        if p.is_file():
            return p.absolute()
    raise InstallError(f"no Python found for {comfyui} (looked for venv/, .venv/ and python_embeded/); pass the "
                       "one that starts ComfyUI with --python")


def checkout_root() -> Path | None:
    """The source checkout this osediff runs from (holding pyproject.toml and comfyui/), or None when it is an
    installed wheel."""
    import osediff

    root = Path(osediff.__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and (root / "comfyui" / "__init__.py").is_file():
        return root
    return None


def make_plan(args: argparse.Namespace) -> Plan:
    from osediff import __version__

    comfyui = find_comfyui(Path(args.comfyui_dir).expanduser())
    python = find_python(comfyui, args.python)
    root = checkout_root()
    pack = Path(args.pack).expanduser().resolve() if args.pack else (root / "comfyui" if root else None)
    if pack is None or not (pack / "__init__.py").is_file():
        raise InstallError(f"no node pack at {pack}: pass --pack with the comfyui/ folder of an osediff source tree"
                           if pack else "this osediff is an installed package without the node pack; pass --pack "
                           "with the comfyui/ folder of an osediff source tree")
    pip = [str(python), "-m", "pip", "install"]
    pip += ["-e", str(root)] if root else [f"osediff=={__version__}"]
    if args.name == "osediff" or "/" in args.name or "\\" in args.name:
        raise InstallError(f"--name {args.name!r}: choose a plain folder name other than 'osediff'")
    target = comfyui / "custom_nodes" / args.name
    linked_here = target.is_symlink() and target.resolve() == pack.resolve() and not args.copy
    taken = os.path.lexists(target) and not linked_here  # a link to this very pack is simply kept
    if taken and not args.force:
        raise InstallError(f"{target} exists; --force replaces it")
    return Plan(comfyui, python, tuple(pip), pack, target, bool(args.copy), taken)


# --- doing it -------------------------------------------------------------------------------------------------
def place_pack(plan: Plan) -> str:
    """Link (or copy) the pack to its target; returns how it was placed."""
    if plan.replace:
        if plan.target.is_symlink() or plan.target.is_file():
            plan.target.unlink()
        else:
            shutil.rmtree(plan.target)
    if plan.target.is_symlink() and plan.target.resolve() == plan.pack.resolve():
        return "already linked"
    if not plan.copy:
        try:
            plan.target.symlink_to(plan.pack, target_is_directory=True)
            return "linked"
        except OSError as e:  # Windows without the symlink privilege
            log.warning("could not link (%s); copying instead", e)
    shutil.copytree(plan.pack, plan.target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return "copied"


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except InstallError as e:
        log.error("%s", e)
        return 2
    if args.dry_run:
        print("dry run, nothing done; would:")
        for line in plan.lines():
            print("  " + line)
        return 0
    for line in plan.lines():
        print(line)
    done = subprocess.run(list(plan.pip), check=False)
    if done.returncode != 0:
        log.error("pip failed in ComfyUI's Python (exit %d); nothing linked", done.returncode)
        return done.returncode
    how = place_pack(plan)
    print(f"pack {how}: {plan.target}")
    print("restart ComfyUI; the nodes are under image/upscaling (Load OSEDiff, Upscale Image (OSEDiff))")
    return 0
