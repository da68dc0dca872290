"""The ``sweep`` verb: create a W&B sweep from a sweep file and run an agent on this machine.

W&B sweeps are coordinated by the W&B server, so they need an account: without credentials this stops with one
line saying how to log in (and what runs without W&B), before anything is created. The sweep file is checked first
(:func:`check_sweep_file`), so a user without an account still learns that the file is wrong.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml

from fsl_med.errors import ConfigError, FslMedError
from fsl_med.runs import has_wandb_key

log = logging.getLogger(__name__)

_SWEEP_ID_RE = re.compile(r"wandb agent (\S+)")


def _wandb_exe() -> str:
    """The ``wandb`` command of this environment (next to the running Python first)."""
    here = Path(sys.executable).parent / "wandb"
    if here.is_file():
        return str(here)
    found = shutil.which("wandb")
    if found is None:
        raise FslMedError("the 'wandb' command is not installed in this environment (pip install wandb)")
    return found


def run_sweep(sweep_file: str | Path, count: int | None = None, create_only: bool = False) -> str:
    """Create the sweep of ``sweep_file`` and run an agent for it (``count`` runs; all when None).

    Returns:
        The sweep id (``entity/project/id``).
    Raises:
        ConfigError: the sweep file is wrong (:func:`check_sweep_file`, before anything else), or W&B is offline
            (``WANDB_MODE``) or has no credentials.
        FslMedError: ``wandb sweep`` failed (its first error line is named); the agent is not started.
    """
    path = Path(sweep_file)
    check_sweep_file(path)
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise ConfigError(f"WANDB_MODE={os.environ['WANDB_MODE']}: W&B sweeps are run by the W&B server and need "
                          "online mode; unset WANDB_MODE (or use 'make ablations' for a local grid without W&B)")
    if not has_wandb_key():
        raise ConfigError("W&B sweeps need a W&B account: run '.venv/bin/wandb login' (or set WANDB_API_KEY) and "
                          "retry; without W&B, 'make train-mri' logs offline and 'make ablations' runs a local grid")
    exe = _wandb_exe()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    p = subprocess.run([exe, "sweep", str(path)], capture_output=True, text=True, env=env)
    out = (p.stdout or "") + (p.stderr or "")
    m = _SWEEP_ID_RE.search(out)
    if p.returncode != 0 or m is None:
        lines = [ln.strip() for ln in out.splitlines() if ln.strip() and "detailed error logs" not in ln]
        errors = [ln for ln in lines if "error" in ln.lower()]
        first = next((ln for ln in errors if ln.lower().startswith("error")), None) or \
            (errors[0] if errors else lines[-1] if lines else f"exit code {p.returncode}")
        raise FslMedError(f"'wandb sweep {path}' failed: {first}")
    sweep_id = m.group(1)
    log.info("created sweep %s", sweep_id)
    if create_only:
        return sweep_id
    agent = [exe, "agent", *(["--count", str(count)] if count else []), sweep_id]
    rc = subprocess.run(agent, env=env).returncode
    if rc != 0:
        raise FslMedError(f"'wandb agent {sweep_id}' exited with code {rc}")
    return sweep_id


# the top-level keys of the W&B sweep configuration schema (wandb/sweeps, config/schema.json)
SWEEP_KEYS = ("apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity", "project",
              "method", "command", "name", "run_cap", "metric", "metrics", "scheduler", "early_terminate", "parameters")
SWEEP_METHODS = ("bayes", "random", "grid", "custom")
_PARAM_KEYS = ("values", "value", "distribution", "probabilities", "min", "max", "mu", "sigma", "q", "a", "b",
               "parameters")
_DISTRIBUTIONS = ("constant", "categorical", "categorical_w_probabilities", "int_uniform", "uniform", "q_uniform",
                  "log_uniform", "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                  "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal", "beta", "q_beta")
# distributions whose min/max are values the run receives (log_uniform's are exponents)
_MINMAX_ARE_VALUES = (None, "int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values",
                      "inv_log_uniform_values")
_ARG_MACROS = ("${args}", "${args_no_boolean_flags}", "${args_no_hyphens}", "${args_json}", "${args_json_file}")
_CONFIG_VERBS = ("run", "train", "eval")


def check_sweep_file(path: str | Path) -> dict[str, Any]:
    """Check a W&B sweep file without W&B: it exists and is UTF-8 YAML; it is a mapping of the W&B sweep schema's
    top-level keys; ``method`` is one of bayes/random/grid/custom; ``parameters`` is a non-empty mapping of parameter
    specs (``values``, ``value``, ``min``/``max``, ``distribution``...); ``metric`` has a ``name``; there is a
    ``command`` (a list of strings) or a ``program``. When the command runs ``fsl-med run|train|eval CONFIG``:
    the config file exists and loads with the command's fixed ``key=value`` overrides, every parameter is a config
    key that takes its values, the parameters reach fsl-med as ``key=value`` (``${args_no_hyphens}``) and a
    ``test/dice*`` metric is one the run logs.

    Returns:
        The sweep document.
    Raises:
        ConfigError: one line naming the file and what is wrong.
    """
    path = Path(path)
    where = f"sweep file {path}"
    if not path.exists():
        raise ConfigError(f"sweep file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"{where}: is a folder, not a YAML file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not UTF-8 text (byte {e.start}); a sweep file is UTF-8 YAML") from e
    except OSError as e:
        raise ConfigError(f"{where}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{where}:{line} is not valid YAML ({problem})") from e
    if doc is None:
        raise ConfigError(f"{where}: is empty; a sweep file is a mapping with method, parameters and command")
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: is a YAML {_yaml_kind(doc)}, expected a mapping of sweep keys (method, "
                          "parameters, command, ...)")
    unknown = [str(k) for k in doc if k not in SWEEP_KEYS]
    if unknown:
        hints = [f"'{k}' (did you mean '{m[0]}'?)" if (m := get_close_matches(k, SWEEP_KEYS, 1)) else f"'{k}'"
                 for k in unknown]
        raise ConfigError(f"{where}: unknown top-level key(s) {', '.join(hints)}; W&B sweep keys are "
                          f"{', '.join(SWEEP_KEYS)}")
    if "method" not in doc:
        raise ConfigError(f"{where}: no 'method' (one of {', '.join(SWEEP_METHODS)})")
    if doc["method"] not in SWEEP_METHODS:
        raise ConfigError(f"{where}: method {doc['method']!r} is not one of {', '.join(SWEEP_METHODS)}")
    params = doc.get("parameters")
    if params is None:
        raise ConfigError(f"{where}: no 'parameters' (a mapping of config keys to their values or distribution)")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}: 'parameters' must be a non-empty mapping of config keys to their values or "
                          f"distribution, got {_yaml_kind(params) if params else 'an empty one'}")
    for key, spec in params.items():
        _check_param(where, str(key), spec)
    metric = doc.get("metric")
    if metric is not None:
        if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
            raise ConfigError(f"{where}: 'metric' must be a mapping with a 'name' (and 'goal': minimize or maximize)")
        if metric.get("goal", "minimize") not in ("minimize", "maximize"):
            raise ConfigError(f"{where}: metric goal {metric['goal']!r} is not minimize or maximize")
    program = doc.get("program")
    if program is not None and (not isinstance(program, str) or not program):
        raise ConfigError(f"{where}: 'program' must be a command name, got {program!r}")
    command = doc.get("command")
    if command is None and program is None:
        raise ConfigError(f"{where}: neither 'command' nor 'program': nothing for the agent to run (e.g. command: "
                          "[${env}, fsl-med, run, experiments/mri.yaml, ${args_no_hyphens}])")
    if command is not None:
        if not isinstance(command, list) or not command or not all(isinstance(c, (str, int, float)) for c in command):
            raise ConfigError(f"{where}: 'command' must be a non-empty list of strings, got {command!r}")
        command = [str(c) for c in command]
        if any("${program}" in c for c in command) and program is None:
            raise ConfigError(f"{where}: 'command' uses ${{program}} but there is no 'program'")
        if program is not None:
            command = [c.replace("${program}", program) for c in command]
        _check_fsl_med_command(where, command, params, metric)
    return doc


def _yaml_kind(x: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(x),
                                                                                          type(x).__name__)


def _check_param(where: str, key: str, spec: Any) -> None:
    """One entry of ``parameters``: a mapping of the schema's parameter keys with a usable search space."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: parameter '{key}' must be a mapping (values: [...], value: x, or min/max/"
                          f"distribution), got {_yaml_kind(spec)} {spec!r}")
    bad = [str(k) for k in spec if k not in _PARAM_KEYS]
    if bad:
        raise ConfigError(f"{where}: parameter '{key}' has unknown key(s) {bad}; a parameter takes "
                          f"{', '.join(_PARAM_KEYS)}")
    dist = spec.get("distribution")
    if dist is not None and dist not in _DISTRIBUTIONS:
        raise ConfigError(f"{where}: parameter '{key}': distribution {dist!r} is not one of {', '.join(_DISTRIBUTIONS)}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise ConfigError(f"{where}: parameter '{key}': 'values' must be a non-empty list, got {spec['values']!r}")
    if not ({"values", "value", "distribution", "parameters"} & set(spec) or {"min", "max"} <= set(spec)):
        raise ConfigError(f"{where}: parameter '{key}' has no search space (values, value, min and max, or a "
                          "distribution)")
    if ("min" in spec) != ("max" in spec):
        raise ConfigError(f"{where}: parameter '{key}' has {'min' if 'min' in spec else 'max'} without "
                          f"{'max' if 'min' in spec else 'min'}")
    if "min" in spec:
        lo, hi = spec["min"], spec["max"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise ConfigError(f"{where}: parameter '{key}': min and max must be numbers, got {lo!r} and {hi!r}")
        if lo > hi:
            raise ConfigError(f"{where}: parameter '{key}': min {lo} is larger than max {hi}")


def _param_values(spec: dict[str, Any]) -> list[Any]:
    """The values of a parameter a run may receive that can be checked without sampling."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if "min" in spec and spec.get("distribution") in _MINMAX_ARE_VALUES:
        return [spec["min"], spec["max"]]
    return []


def _check_fsl_med_command(where: str, command: list[str], params: dict[str, Any],
                           metric: dict[str, Any] | None) -> None:
    """When ``command`` runs ``fsl-med run|train|eval CONFIG [key=value ...]``: the config and parameters load."""
    from fsl_med.config import load_config

    verb_at = None
    for i, c in enumerate(command):
        if Path(c).name == "fsl-med" or (c == "fsl_med" and i > 0 and command[i - 1] == "-m"):
            verb_at = i + 1
            break
    if verb_at is None or verb_at >= len(command) or command[verb_at] not in _CONFIG_VERBS:
        return
    rest = command[verb_at + 1:]
    macros = [c for c in rest if c.startswith("${")]
    if "${args_no_hyphens}" not in macros:
        used = [m for m in macros if m in _ARG_MACROS]
        raise ConfigError(f"{where}: the command passes the parameters to fsl-med "
                          + (f"as {used[0]}" if used else "not at all")
                          + "; fsl-med takes key=value overrides: end the command with ${args_no_hyphens}")
    args = [c for c in rest if not c.startswith("${")]
    config = next((c for c in args if "=" not in c and not c.startswith("-")), None)
    fixed = [c for c in args if "=" in c and not c.startswith("-")]
    if config is None:
        return  # fsl-med itself names the missing config file
    cfg_path = Path(config)
    if not cfg_path.is_file():
        raise ConfigError(f"{where}: the command's config file {config} does not exist (relative to {Path.cwd()}, "
                          "where the agent runs)")
    try:
        cfg = load_config(cfg_path, fixed)
    except ConfigError as e:
        raise ConfigError(f"{where}: the command's config {config} with its overrides: {e}") from e
    for key, spec in params.items():
        if "parameters" in spec:
            continue  # nested parameters are passed as one JSON value: fsl-med itself checks them
        if not _has_key(cfg, str(key)):
            raise ConfigError(f"{where}: parameter '{key}' is not a config key of {config}")
        for value in _param_values(spec):
            try:
                load_config(cfg_path, [*fixed, f"{key}={value}"])
            except ConfigError as e:
                raise ConfigError(f"{where}: parameter '{key}' value {value!r}: {e}") from e
    swept = {str(k) for k in params}
    name = (metric or {}).get("name", "")
    if name.startswith("test/dice") and "eval.variants" not in swept:
        from fsl_med.evaluation.scoring import logged_dice_metrics

        logged = logged_dice_metrics(cfg)
        if name not in logged:
            raise ConfigError(f"{where}: metric {name!r} is not logged by this command (it logs "
                              f"{', '.join(sorted(logged))})")


def _has_key(cfg: Any, key: str) -> bool:
    """Whether the dotted ``key`` is a key of the config ``cfg`` (whatever its value, null included)."""
    from omegaconf import DictConfig

    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node.keys():
            return False
        node = node[part]
    return True
