"""Would transformers accept the config a frankenmerge re-layered? Asked of its config class, in a child process.

Why a module: the answer needs transformers imported, and in the merging process that costs ~1.5 s
(transformers imports much of torch.distributed on the way) and ~80 MiB, while no output byte depends
on it: it is a warning (an error with --strict). Config classes need no torch, so a child process asks
them with torch hidden from it (`sys.modules["torch"] = None`: transformers then loads configurations
only): ~0.7 s and ~65 MiB, on the other core. `LateCheck` starts the child when the config is made; the
child imports transformers at once, then waits for the config on its stdin. Joining sends the config and
reads the warnings back.

When the answer is needed: at once (into `plan.warnings`, as before) for everyone except the command
line's `run`, which asks within `config_checks_deferred` and joins the child when the warnings are next
needed: `MergePlan.settle_warnings`, called by --strict's refusal before anything is read, by `plan`'s
view, by a stage's plan before the next stage reads it, and by the run before report.json and its
summary. While a child runs, the scheduler counts it (`CHECK_PROCESS_BYTES`) in the process's baseline,
so the run's process tree stays under --ram.

Invariants: the config checked is the one as it stood when the check started (later edits of the output
config never race with it); a settled plan's warnings are the same list in the same order whether or not
the check was deferred (it is appended last, and the report is written from the settled list); whatever
goes wrong in the child (no Python, a crash, transformers broken) is one warning, never an exception; a
parent that dies leaves the child reading end-of-file, and it exits.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.util import find_spec

_DEFERRED: ContextVar[bool] = ContextVar("mergeng_config_checks_deferred", default=False)
_SPARE: ContextVar[subprocess.Popen | OSError | None] = ContextVar("mergeng_config_check_child", default=None)

# Peak RSS of the child, measured at ~65 MiB (transformers 5.25, Python 3.11, a Llama config); counted with room.
CHECK_PROCESS_BYTES = 96 * 2**20


@contextmanager
def config_checks_deferred(recipe_text: str = ""):
    """Within it, plans leave re-layered configs' checks running in their child process (see the module's note).
    A recipe that slices layers (`layer_range` in its text) has the child started at once, so that it imports
    transformers while the caller still imports torch; a child no plan took is stopped on the way out."""
    wanted = "layer_range" in recipe_text and "transformers" not in sys.modules and find_spec("transformers") is not None
    spare = _start_child() if wanted else None
    token = _DEFERRED.set(True)
    _SPARE.set(spare)
    try:
        yield
    finally:
        _DEFERRED.reset(token)
        stop_spare()


def stop_spare() -> None:
    """Stop the child `config_checks_deferred` started if no plan took it (called before the scheduler
    measures the process's baseline, so an idle child never outlives planning uncounted)."""
    spare = _SPARE.get()
    _SPARE.set(None)
    if isinstance(spare, subprocess.Popen):
        spare.kill()
        spare.wait()


def _start_child() -> subprocess.Popen | OSError:
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    try:
        return subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, text=True)
    except OSError as e:
        return e


class LateCheck:
    """A child process asking transformers about one config; `join` gives its warnings (once, then cached)."""

    def __init__(self, config: dict):
        self._config = json.dumps(config)
        self._warnings: list[str] | None = None
        child = _SPARE.get() or _start_child()  # the child config_checks_deferred started, else a new one
        _SPARE.set(None)
        if isinstance(child, OSError):
            self._child, self._warnings = None, [_unasked(f"{type(child).__name__}: {child}")]
        else:
            self._child = child

    @property
    def running(self) -> bool:
        return self._warnings is None

    def join(self) -> list[str]:
        if self._warnings is None:
            out, err = self._child.communicate(self._config)
            try:
                answer = json.loads(out) if self._child.returncode == 0 else None
            except ValueError:
                answer = None
            ok = isinstance(answer, list) and all(isinstance(w, str) for w in answer)
            last = (err.strip().splitlines() or [f"exit status {self._child.returncode}"])[-1]
            self._warnings = answer if ok else [_unasked(last)]
        return self._warnings


def _unasked(why: str) -> str:
    return f"config.json: could not ask transformers whether it accepts the re-layered config ({why})"


def check_config(config: dict, warnings: list[str], late: list[LateCheck]) -> None:
    """Check a re-layered `config` (where transformers is installed): its warnings go into `warnings` now, or,
    within `config_checks_deferred`, the running check into `late`. A process that has imported transformers
    already asks it itself."""
    if "transformers" in sys.modules:  # already imported here (the tests, the Python API after a load): asked here, in ms
        check_with_transformers(config, warnings)
        return
    if find_spec("transformers") is None:  # optional ([test], [moe], [tokenizers] extras): without it, no check
        return
    check = LateCheck(config)
    if _DEFERRED.get():
        late.append(check)
    else:
        warnings += check.join()


def check_with_transformers(config: dict, warnings: list[str]) -> None:
    """Have transformers' config class validate a re-layered config, so a config it would refuse is said
    before the merge is used (a warning; an error with --strict), never found when loading the merged model."""
    model_type = config.get("model_type")
    try:
        import transformers
    except ImportError:
        return
    try:
        transformers.AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except ValueError as e:
        if "Unrecognized model" in str(e) or "model_type" in str(e).split(":")[0]:
            return  # a model type this transformers does not know: nothing to check against
        warnings.append(f"config.json: transformers' {model_type} config refuses the re-layered config "
                        f"({str(e).splitlines()[-1].strip()}); the merged model will not load as it is")
    except Exception as e:  # noqa: BLE001  any other refusal is reported the same way
        warnings.append(f"config.json: transformers' {model_type} config refuses the re-layered config "
                        f"({type(e).__name__}: {str(e).splitlines()[-1].strip() if str(e) else ''}); "
                        f"the merged model will not load as it is")


def _child() -> None:
    """The child: transformers without torch (configurations only), imported before the config arrives."""
    sys.modules["torch"] = None  # type: ignore[assignment]  (find_spec then says torch is absent)
    try:
        importlib.import_module("transformers.models.auto.configuration_auto")  # while the parent still plans and merges
    except ImportError:
        pass
    text = sys.stdin.read()
    if not text:  # no config came (the parent needed no check, or is gone)
        return
    config = json.loads(text)
    warnings: list[str] = []
    check_with_transformers(config, warnings)
    sys.stdout.write(json.dumps(warnings))


if __name__ == "__main__":
    _child()
