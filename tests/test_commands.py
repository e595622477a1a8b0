"""The user commands are installed (setup.cfg's console_scripts) and the package lists every module folder."""
import configparser
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

COMMANDS = {"soho-convert": "convert", "soho-index-shards": "index_shards",
            "soho-attach-detections": "attach_detections", "soho-consolidate": "consolidate_checkpoint",
            "soho-export": "export", "soho-retrieve": "retrieve", "soho-plan": "plan"}


def test_every_user_command_is_installed_and_runs_its_tool():
    for command, tool in COMMANDS.items():
        done = subprocess.run([str(Path(sys.executable).parent / command), "--help"], capture_output=True, text=True,
                              cwd="/", timeout=120)
        assert done.returncode == 0, (command, done.stderr[-1000:])
        # the same text as `python tools/<tool>.py --help`: one program, two ways in
        first = (ROOT / "tools" / f"{tool}.py").read_text().split('"""')[1].strip().splitlines()[0]
        assert first.split(":")[0][:40] in " ".join(done.stdout.split()), (command, first)


def test_setup_cfg_packages_every_module_folder():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "soho_ds").rglob("__init__.py")}
    assert listed == folders | {"soho_ds.tools"}, listed ^ (folders | {"soho_ds.tools"})
    scripts = dict(line.split(" = ") for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line)
    assert {k: v.split(":")[0].rsplit(".", 1)[1] for k, v in scripts.items()} == COMMANDS
