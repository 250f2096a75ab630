"""The error contract of every command (``lub_fast.errors``): a known failure is one line
``lub_fast.<command>: error: ...`` and exit code 2, never a traceback; SIGTERM is 143; a bug keeps
its traceback; every ``--help`` documents the codes."""

import importlib
import os
import pkgutil
import signal
import subprocess
import sys
import time

import pytest

import lub_fast
from lub_fast import convert, distill, finetune, info, prepare, pretrain
from lub_fast.errors import EXIT_PREEMPTED, EXIT_USAGE, UsageError, run_command

MAINS = {"info": info, "prepare": prepare, "pretrain": pretrain, "distill": distill, "finetune": finetune,
         "convert": convert}  # fmt: skip
# Each known error class of the package, and the base class it must keep for existing handlers.
KNOWN = {
    "lub_fast.tf1.bundle.TF1CheckpointError": Exception,
    "lub_fast.checkpoint.CheckpointError": RuntimeError,
    "lub_fast.data.shards.ShardError": ValueError,
    "lub_fast.data.inputs.PrepareError": Exception,
    "lub_fast.distill_cache.CacheError": ValueError,
    "lub_fast.distillation.DistillError": ValueError,
    "lub_fast.recipes.PretrainError": ValueError,
    "lub_fast.data.loader.BatchError": ValueError,
    "lub_fast.config_cli.ConfigError": ValueError,
    "lub_fast.tasks.io.TaskDataError": ValueError,
    "lub_fast.train.NonFiniteError": FloatingPointError,
    "lub_fast.lock.LockedError": UsageError,
}


def _usage_errors() -> dict[str, type]:
    """Every UsageError subclass defined anywhere in the package (all modules imported)."""
    for module in pkgutil.walk_packages(lub_fast.__path__, "lub_fast."):
        importlib.import_module(module.name)
    found, todo = {}, [UsageError]
    while todo:
        for cls in todo.pop().__subclasses__():
            if cls.__module__.startswith("lub_fast."):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
            todo.append(cls)
    return found


def _instance(cls: type) -> BaseException:
    error = cls.__new__(cls)
    Exception.__init__(error, "data/x.txt:3: the rule it broke;\nwhat to do")
    return error


def test_errors_every_known_error_class_is_a_usage_error():
    found = _usage_errors()
    missing = sorted(set(KNOWN) - set(found))
    assert not missing, f"not UsageError subclasses: {missing}"
    for name, base in KNOWN.items():
        assert issubclass(found[name], base), f"{name} lost its base {base.__name__}"


@pytest.mark.parametrize("name", sorted(_usage_errors()))
def test_errors_every_usage_error_is_one_line_and_exit_2(name, capsys):
    error = _instance(_usage_errors()[name])

    def body():
        raise error

    assert run_command("pretrain", body) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err == "lub_fast.pretrain: error: data/x.txt:3: the rule it broke; what to do\n", err


def test_errors_a_bug_keeps_its_traceback():
    def body():
        raise KeyError("config")

    with pytest.raises(KeyError):
        run_command("convert", body)


def test_errors_sigterm_is_143_and_forked_workers_die_of_it(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def body():
        child = os.fork()
        if child == 0:  # inherits the handler: must die of the signal, not raise in the worker
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        pytest.fail("SIGTERM did not stop the body")

    assert run_command("prepare", body) == EXIT_PREEMPTED
    assert capsys.readouterr().err == "lub_fast.prepare: stopped by SIGTERM; run the same command again to continue\n"
    assert signal.getsignal(signal.SIGTERM) is before  # restored


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing"
    out = tmp_path / "out"
    return {
        "prepare": ([str(missing / "a.txt"), "--output", str(out), "--build-vocab", "100"], "a.txt"),
        "pretrain": (["--data", str(missing), "--output", str(out), "--train.device=cpu"], str(missing)),
        "distill": (["--teacher", str(missing), "--data", str(missing), "--output", str(out)], str(missing)),
        "finetune": (["--task", "afqmc", "--model", str(missing), "--data.train", str(missing / "train.json"),
                      "--data.dev", str(missing / "dev.json"), "--output", str(out)], str(missing)),  # fmt: skip
        "convert": ([str(missing), str(out)], str(missing)),
    }


@pytest.mark.parametrize("command", ["prepare", "pretrain", "distill", "finetune", "convert"])
def test_errors_each_command_ends_bad_input_with_one_line(command, tmp_path, capsys):
    argv, named = _bad_inputs(tmp_path)[command]
    assert MAINS[command].main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lub_fast.{command}: error: ") and named in lines[0], err[-2000:]
    assert not (tmp_path / "out").exists()  # stopped before writing anything


def test_errors_a_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lub_fast.convert", str(tmp_path / "missing"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("lub_fast.convert: error: "), proc.stderr[-2000:]


@pytest.mark.parametrize("command", sorted(MAINS))
def test_errors_help_documents_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as done:
        MAINS[command].main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for code in ("0 finished", "2 bad input", "143 stopped by SIGTERM after saving", "1 a bug"):
        assert code in text, f"{command} --help lacks {code!r}"
