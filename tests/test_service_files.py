"""The service files parse and agree with the server's exit-code policy."""

from __future__ import annotations

import configparser
import plistlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_launchd_plist_runs_start_production_and_restarts_only_on_failure():
    plist = plistlib.loads((ROOT / "deploy" / "com.tkr-embed.server.plist").read_bytes())
    assert plist["ProgramArguments"][0].endswith("/start_production.sh")
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # a drained, clean exit (0) stays stopped
    assert plist["ExitTimeOut"] > 30  # longer than the default drain grace period


def test_systemd_unit_stops_on_config_and_model_errors_and_drains_on_sigterm():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(ROOT / "deploy" / "tkr-embed.service")
    svc = unit["Service"]
    assert svc["ExecStart"].endswith("/start_production.sh")
    assert svc["KillSignal"] == "SIGTERM" and int(svc["TimeoutStopSec"]) > 30
    assert set(svc["RestartPreventExitStatus"].split()) == {"2", "3"}  # cli.cmd_serve's codes
    assert svc["Restart"] == "on-failure"
