"""The `kcp` command line, end to end on the embedded digits, and its error handling."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from kcp import cli
from tests.conftest import IN_PROCESS_BEAM, fresh_run


def test_run_writes_every_stage_output(digits_run):
    for relative in ("config.yaml", "data/metadata.json", "data/labels.txt", "train/model.keras",
                     "train/metrics.json", "train/history.json", "export/model/1/saved_model.pb"):
        assert os.path.exists(os.path.join(digits_run, relative)), relative


def test_metrics_json_has_the_promised_keys(digits_run):
    with open(os.path.join(digits_run, "train", "metrics.json")) as handle:
        metrics = json.load(handle)
    for split in ("train", "validation", "test"):
        assert 0.0 <= metrics[split]["accuracy"] <= 1.0
        assert metrics[split]["loss"] > 0
    assert metrics["epochs"] == 3
    assert metrics["examples_per_second"] > 0 and metrics["wall_seconds"] > 0
    with open(os.path.join(digits_run, "train", "history.json")) as handle:
        history = json.load(handle)
    assert len(history["loss"]) == len(history["val_accuracy"]) == 3


def test_resolved_config_is_written_to_the_run(digits_run):
    with open(os.path.join(digits_run, "config.yaml")) as handle:
        written = yaml.safe_load(handle)
    assert written["train"]["epochs"] == 3
    assert set(written) == {"data", "model", "train", "tune", "export"}


def test_run_prints_both_accuracies(tmp_path, capsys):
    code = cli.main(["run", "--run-dir", str(tmp_path), "--set", "train.epochs=1", "--set", "data.limit=200",
                     "--", *IN_PROCESS_BEAM])
    assert code == 0
    out = capsys.readouterr().out
    assert "reloaded  export test accuracy" in out and "(trainer " in out
    assert "[train] cnn, 1 epoch, batch" in out and " parameters, 1 epoch, " in out  # not "1 epochs"
    code = cli.main(["run", "--run-dir", str(tmp_path / "strict"), "--set", "train.epochs=1", "--set", "data.limit=200",
                     "--set", "export.min_accuracy=1.0", "--", *IN_PROCESS_BEAM])
    out = capsys.readouterr().out  # an export validation does not bless fails the run, as `kcp validate` does
    assert code == 1 and "-> NOT blessed: export accuracy" in out and "is below export.min_accuracy 1.0" in out
    assert "[report] " in out  # the report is still written


def test_a_stage_on_an_existing_run_keeps_its_config(digits_run, tmp_path, capsys):
    run_dir = str(tmp_path)
    assert cli.main(["preprocess", "--run-dir", run_dir, "--set", "data.limit=120", "--", *IN_PROCESS_BEAM]) == 0
    assert cli.main(["train", "--run-dir", run_dir, "--set", "train.epochs=1"]) == 0
    with open(os.path.join(run_dir, "config.yaml")) as handle:
        written = yaml.safe_load(handle)
    assert written["data"]["limit"] == 120 and written["train"]["epochs"] == 1
    assert cli.main(["export", "--run-dir", run_dir]) == 0
    assert cli.main(["export", "--run-dir", run_dir]) == 0
    assert sorted(os.listdir(os.path.join(run_dir, "export", "model"))) == ["1", "2"]


@pytest.mark.parametrize("argv, key", [
    (["run", "--set", "train.epochs=0"], "train.epochs"),
    (["run", "--set", "model.name=nope"], "model.name"),
    (["run", "--source", "nope"], "data.source"),
    (["train", "--set", "train.optimizer=adamax"], "train.optimizer"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, key):
    code = cli.main([*argv[:1], "--run-dir", str(tmp_path), *argv[1:]])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in err
    assert not os.path.exists(tmp_path / "data" / "metadata.json")


@pytest.mark.parametrize("argv", [["run", "--set", "train.epochs=0"], ["preprocess", "--source", "nope"]])
def test_a_new_run_that_fails_at_once_leaves_no_empty_folder(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/earlier")  # the user's own folders stay
    assert cli.main(argv) == 2
    assert "error:" in capsys.readouterr().err
    assert os.listdir("runs") == ["earlier"]
    assert cli.main([argv[0], "--run-dir", "runs/named", *argv[1:]]) == 2  # nor one named that was not there
    assert os.listdir("runs") == ["earlier"]
    assert cli.main([argv[0], "--run-dir", "new/a/b", *argv[1:]]) == 2  # nor the folders above it that it made
    assert sorted(os.listdir(".")) == ["runs"]


def test_train_refuses_a_data_key_that_differs_from_the_preprocessed_data(digits_run, capsys):
    """It used to train on the data as they were and record the new value in config.yaml, silently."""
    config_before = open(os.path.join(digits_run, "config.yaml")).read()
    for command in ("train", "tune"):
        assert cli.main([command, "--run-dir", digits_run, "--set", "data.limit=7"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"kcp {command}: error: data.limit: 7, but {digits_run}/data was preprocessed with 0; data keys apply when "
            f"preprocessing: kcp preprocess --run-dir {digits_run} --set data.limit=..., then train")
    assert open(os.path.join(digits_run, "config.yaml")).read() == config_before


def test_train_without_data_says_what_to_run(tmp_path, capsys):
    for command in ("train", "tune"):
        assert cli.main([command, "--run-dir", str(tmp_path / "typo")]) == 2
        assert "run `kcp preprocess" in capsys.readouterr().err
        assert not os.path.exists(tmp_path / "typo")  # a mistyped run directory is not created


def test_a_command_that_fails_with_one_line_leaves_the_recorded_config_as_it_was(digits_data, tmp_path, capsys):
    """A refused setting must not become the run's: later commands without it would fail the same way."""
    run_dir = fresh_run(digits_data, tmp_path)
    path = os.path.join(run_dir, "config.yaml")
    assert cli.main(["train", "--run-dir", run_dir, "--set", "train.epochs=1", "--set", "train.strategy=tpu"]) == 2
    assert "train.strategy: 'tpu' but no TPU was found" in capsys.readouterr().err
    assert not os.path.exists(path)  # nothing was recorded before: nothing is
    with open(path, "w") as handle:
        handle.write("train:\n  epochs: 2\n")
    for argv in (["--set", "train.strategy=tpu"], ["--model", "gpt"]):  # no TPU; gpt takes language data
        assert cli.main(["train", "--run-dir", run_dir, *argv]) == 2
        assert "error" in capsys.readouterr().err
        with open(path) as handle:
            assert handle.read() == "train:\n  epochs: 2\n"


def test_the_console_script_exits_2_naming_the_key(tmp_path):
    kcp = os.path.join(os.path.dirname(sys.executable), "kcp")
    result = subprocess.run([kcp, "run", "--run-dir", str(tmp_path), "--set", "model.name=nope"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("kcp run: error: model.name: 'nope' is not one of "
                                     "cnn, gpt, resnet, rnn, transformer")


def test_every_subcommand_help_shows_an_example(capsys):
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit) as exited:
            cli.main([command, "--help"])
        assert exited.value.code == 0
        assert f"kcp {command}" in capsys.readouterr().out.split("examples:")[1]


def test_stage_modules_ignore_unknown_launcher_flags(tmp_path, caplog):
    from trainer import task

    code = task.main(["--run-dir", str(tmp_path), "--set", "train.epochs=0", "--launcher-flag=1"])
    assert code == 2  # the flag was ignored; the bad value still fails
    assert "--launcher-flag=1" in caplog.text
    # a launcher's flag that begins like one of ours is not taken for it (argparse's abbreviations)
    caplog.clear()
    code = task.main(["--run-dir", str(tmp_path), "--set", "train.epochs=0", "--mode=train", "--conf=x", "--ver=1"])
    assert code == 2  # train.epochs=0, as above
    assert "ignoring flags this stage does not know: --mode=train --conf=x --ver=1" in caplog.text


def test_kcp_itself_rejects_unknown_flags(tmp_path):
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", "--run-dir", str(tmp_path), "--epochs", "3"])
    assert exited.value.code == 2


def test_describe_model_shows_the_family_config_with_its_defaults(capsys):
    code = cli.main(["describe-model", "--model", "resnet", "--set", "model.depth=8", "--set", "model.width=8",
                     "--input-shape", "8,8,1", "--num-classes", "10"])
    assert code == 0
    out = capsys.readouterr().out
    config_lines = out.split("model:\n", 1)[1].split("\n")
    assert "  name: \"resnet\"" in config_lines and "  depth: 8" in config_lines
    assert "  version: 1" in config_lines  # a default the family applied
    assert not any(line.startswith("  filters:") for line in config_lines)  # cnn's key, not resnet's
    assert "resnet8_v1" in out and "Total params:" in out


def test_describe_model_shows_what_a_data_dependent_default_comes_to(capsys):
    code = cli.main(["describe-model", "--model", "resnet", "--set", "model.depth=8", "--input-shape", "12",
                     "--vocab-size", "50", "--num-classes", "3"])
    assert code == 0
    assert "  width: 0 (applied: 64)" in capsys.readouterr().out.split("\n")  # text: the embedding's width
    assert cli.main(["describe-model", "--model", "resnet", "--input-shape", "40,1", "--num-classes", "3"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert {"  dropout: null (applied: 0.3)", "  depth: 0 (applied: 8)", "  kernel_size: null (applied: 5)"} <= set(lines)
    assert cli.main(["describe-model", "--model", "resnet", "--set", "model.dropout=0.2", "--input-shape", "40,1",
                     "--num-classes", "3"]) == 0
    assert "  dropout: 0.2" in capsys.readouterr().out.split("\n")  # set: shown as set


def test_describe_model_tells_a_familys_training_default_from_a_key_the_user_set(capsys):
    assert cli.main(["describe-model", "--model", "gpt", "--set", "model.size=custom", "--set", "model.layers=1",
                     "--set", "model.dim=16", "--set", "model.heads=2", "--set", "train.epochs=7",
                     "--input-shape", "16", "--modality", "language", "--vocab-size", "259",
                     "--num-classes", "259"]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert "training defaults of gpt (as applied):" in lines
    assert "  train.epochs: 7 (set; gpt's default: 4)" in lines  # the user's, not presented as gpt's
    assert '  train.optimizer: "adamw"' in lines  # gpt's own, as applied


def test_a_key_of_another_family_exits_2_naming_the_family(capsys):
    code = cli.main(["describe-model", "--model", "rnn", "--set", "model.depth=8", "--input-shape", "8,3",
                     "--num-classes", "2"])
    assert code == 2
    assert "model.depth: not a key of the rnn family; allowed:" in capsys.readouterr().err


def test_stages_that_only_read_leave_the_recorded_config_alone(digits_run):
    path = os.path.join(digits_run, "config.yaml")
    with open(path) as handle:
        before = handle.read()
    assert cli.main(["validate", "--run-dir", digits_run, "--set", "export.min_accuracy=0.5"]) in (0, 1)  # ran
    assert cli.main(["report", "--run-dir", digits_run, "--set", "export.min_accuracy=0.25"]) == 0
    with open(path) as handle:
        assert handle.read() == before


def test_import_kcp_is_light_and_its_api_loads_on_first_use():
    script = ("import sys, kcp; heavy = [m for m in ('tensorflow', 'keras', 'apache_beam') if m in sys.modules]; "
              "print(heavy, kcp.Run.__module__, 'Run' in dir(kcp)); "
              "print(sorted(set(kcp.api.__all__) - {name for name in dir(kcp) if callable(getattr(kcp, name))})); "
              "import kcp.reporting; print(kcp.report is kcp.api.report)")  # a run's report needs that package
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    # every API name, kcp.generate among them; kcp.report stays the function once its package is imported
    assert result.stdout.split("\n")[:3] == ["[] kcp.api True", "[]", "True"]


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    from kcp.cli import commands

    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.HANDLERS, "report", interrupted)
    assert cli.main(["report", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.splitlines() == ["kcp report: interrupted; run the same command again"]
    monkeypatch.setitem(commands.HANDLERS, "train", interrupted)
    assert cli.main(["train", "--run-dir", str(tmp_path)]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "kcp train: interrupted; run the same command again (it resumes from the last checkpoint)"]

    def interrupted_in_beam(*_):  # what Beam's DirectRunner raises for a Ctrl-C inside a job
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as error:
            raise RuntimeError("KeyboardInterrupt [while running 'Predict']") from error

    monkeypatch.setitem(commands.HANDLERS, "predict", interrupted_in_beam)
    assert cli.main(["predict", "--run-dir", str(tmp_path), "--input", "digits", "--output", "p"]) == 130
    assert capsys.readouterr().err.splitlines() == [
        "kcp predict: interrupted; run the same command again (it replaces what this one left under --output)"]


def test_api_misuse_is_one_clear_error_and_writes_nothing(digits_run, tmp_path):
    from kcp import api
    from kcp.core.errors import UserError
    from kcp.core.layout import RunLayout

    with pytest.raises(UserError, match=r"^Run: run_dir must be a path \(str\), got NoneType"):
        api.Run(None)
    with pytest.raises(UserError, match=r"^train: run_dir must be a path \(str\), got int 5$"):
        api.train(5)  # the module functions name themselves, as Run does
    assert api.Run(tmp_path / "as_path").run_dir == str(tmp_path / "as_path")  # a pathlib.Path is fine
    assert api.Run("~/kcp-runs/a").run_dir == os.path.join(os.path.expanduser("~"), "kcp-runs", "a")  # not a folder "~"
    with pytest.raises(UserError, match=r"^Run: run_dir is empty; give a folder such as runs/digits$"):
        api.Run("")
    missing = tmp_path / "never_preprocessed"
    with pytest.raises(UserError, match=r"data/metadata.json: not found; run `kcp preprocess --run-dir "):
        api.train(str(missing), "cnn")
    with pytest.raises(UserError, match=rf"^{missing}/data/metadata.json: not found"):
        api.train(missing, "cnn")  # a pathlib.Path, as str
    assert not (missing / "config.yaml").exists()  # nothing recorded for a run that has no data
    with pytest.raises(UserError, match=r"nofile.npz"):
        api.preprocess(str(missing), "npz:nofile.npz")
    assert not (missing / "config.yaml").exists()  # nor for a source that cannot be read
    with pytest.raises(UserError, match=r"^--version: expected an integer version, got '1'$"):
        RunLayout(digits_run).version_dir("model", "1")


def test_the_api_takes_beam_args_as_a_list_or_one_shell_string():
    from kcp.core.beamio import beam_arg_list
    from kcp.core.errors import UserError

    assert beam_arg_list("--runner=DataflowRunner  --region 'europe west'") == [
        "--runner=DataflowRunner", "--region", "europe west"]
    assert beam_arg_list(("--runner=DirectRunner",)) == ["--runner=DirectRunner"]
    with pytest.raises(UserError, match=r"^beam_args: expected a list of flags such as \['--runner=DirectRunner'\], "
                                        r"got 5$"):
        beam_arg_list(5)


def test_the_api_takes_overrides_as_a_list_a_string_or_a_mapping():
    from kcp.core.config_load import override_list, resolve_config
    from kcp.core.schema import ConfigError

    assert override_list("train.epochs=3") == ["train.epochs=3"]
    assert override_list({"train.epochs": 3, "train.optimizer": "sgd", "model.dropout": None}) == [
        "train.epochs=3", 'train.optimizer="sgd"', "model.dropout=null"]
    for overrides in (["train.epochs=3"], ("train.epochs=3",), "train.epochs=3", {"train.epochs": 3}):
        assert resolve_config(None, overrides=overrides).train.epochs == 3
    config = resolve_config(None, overrides={"train.optimizer": "sgd", "model.dropout": 0.2})
    assert (config.train.optimizer, config.model.dropout) == ("sgd", 0.2)
    assert override_list(["train.epochs=3", {"model.dropout": 0.2}]) == ["train.epochs=3", "model.dropout=0.2"]
    with pytest.raises(ConfigError, match=r"^overrides: 3 is neither a 'section.key=value' string nor a "):
        override_list(["train.epochs=3", 3])
    with pytest.raises(ConfigError, match=r"^overrides: 5 is not a list of 'section.key=value' strings$"):
        override_list(5)
    assert override_list(None) == []


def test_routine_native_lines_are_dropped_and_everything_else_kept(capfd):
    """filtered_stderr drops the known start-up lines written to descriptor 2 by this process
    and its children, and passes every other byte through, partial last line included."""
    from kcp.core.quiet import filtered_stderr

    noisy = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
             b"I0000 00:00:1795720155.422677   12091 port.cc:153] oneDNN custom operations are on. You may see\n"
             b"E0000 00:00:1795720163.379259   12091 cuda_platform.cc:52] failed call to cuInit: INTERNAL: x\n"
             b"E0000 00:00:1795825088.595481   10285 util.cc:131] oneDNN supports DT_INT64 only on platforms with "
             b"AVX-512. Falling back to the default Eigen-based implementation if present.\n"
             b"E0000 00:00:1795827271.222125   31813 node_def_util.cc:682] NodeDef mentions attribute "
             b"use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset; ...>\n"
             b"W0000 00:00:1795825143.266024   10655 local_rendezvous.cc:412] Local rendezvous is aborting with "
             b"status: INVALID_ARGUMENT: assertion failed: [instance 0: not a PNG, JPEG, GIF or BMP image]\n"
             b"\t [[{{function_node __inference_map_while_body_537_2269}}{{node map/while/Assert/Assert}}]]\n"
             b"W0000 00:00:1795884586.720902   18115 dataset.cc:997] Input of GeneratorDatasetOp::Dataset will not be "
             b"optimized because the dataset does not implement the AsGraphDefInternal() method needed to apply "
             b"optimizations.\n")
    with filtered_stderr():
        os.write(2, noisy[:50])  # a line split across writes is still recognised
        os.write(2, noisy[50:] + b"W0000 a real warning\n"
                 b"W0000 00:00:1 local_rendezvous.cc:412] Local rendezvous is aborting with status: OUT_OF_RANGE\n"
                 b"\t [[{{node IteratorGetNext}}]]\n")  # the op context of a line that is kept is kept
        subprocess.run([sys.executable, "-c", "import os; os.write(2, b'child: No semi_persistent_directory found: x\\n"
                        "child error\\n')"], check=True)
        os.write(2, b"no newline at the end")
    assert capfd.readouterr().err == ("W0000 a real warning\nW0000 00:00:1 local_rendezvous.cc:412] Local rendezvous "
                                      "is aborting with status: OUT_OF_RANGE\n\t [[{{node IteratorGetNext}}]]\n"
                                      "child error\nno newline at the end")
    with filtered_stderr(enabled=False):  # --verbose
        os.write(2, noisy)
    assert capfd.readouterr().err == noisy.decode()


def test_drain_passes_on_the_last_lines_before_a_hard_exit():
    """A thread that ends the process with os._exit (the tuning worker's watchdog) calls
    drain() first: its last line, and a child's, reach the real stderr; the routine ones don't."""
    script = ("import os, subprocess, sys\n"
              "from kcp.core.quiet import drain, filtered_stderr\n"
              "with filtered_stderr():\n"
              "    subprocess.run([sys.executable, '-c', \"import os; os.write(2, b'child line\\\\n')\"])\n"
              "    print('oneDNN is fine] oneDNN custom operations are on.', file=sys.stderr)\n"
              "    print('the chief is gone; this worker stops', file=sys.stderr)\n"
              "    drain()\n"
              "    os._exit(0)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stderr == "child line\nthe chief is gone; this worker stops\n"


def test_after_ctrl_c_only_kcps_own_lines_reach_the_terminal():
    """A terminal's Ctrl-C reaches every process of the group: each of Beam's worker processes
    printed its KeyboardInterrupt traceback and the driver's threads theirs (91 lines for one
    `kcp predict`, around the one line that says what happened). Lines before the Ctrl-C pass;
    after it, only `kcp COMMAND: ...` lines. After a block that was not interrupted the handler is
    Python's own again; after one that was, in a process that ends with it (the `kcp` script), a
    second Ctrl-C (or `timeout` passing one on) while the command winds down ends the process at once,
    130, with no KeyboardInterrupt traceback."""
    script = ("import os, signal, subprocess, sys, time\n"
              "from kcp.core.quiet import filtered_stderr\n"
              "with filtered_stderr(hard_exit=True):\n"
              "    pass\n"
              "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler, flush=True)\n"
              "with filtered_stderr(hard_exit=True):\n"
              "    print('a warning before', file=sys.stderr, flush=True)\n"
              "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "    try:\n"
              "        os.killpg(0, signal.SIGINT)\n"  # as a terminal does: this process and its child
              "        signal.pause()\n"
              "    except KeyboardInterrupt:\n"
              "        child.wait()\n"  # its KeyboardInterrupt traceback goes to the same pipe
              "        print('Exception in thread Thread-3: RuntimeError: Worker subprocess exited', file=sys.stderr)\n"
              "        print('kcp predict: interrupted; run the same command again', file=sys.stderr)\n"
              "os.kill(os.getpid(), signal.SIGINT)\n"  # the second, after the block
              "time.sleep(30)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            start_new_session=True)  # its own process group, which the script interrupts
    assert result.returncode == 130, result.stderr
    assert result.stderr == "a warning before\nkcp predict: interrupted; run the same command again\n"
    assert result.stdout == "True\n"


def test_a_second_ctrl_c_while_the_first_winds_down_ends_the_process_at_once():
    """Inside the block: the first Ctrl-C's clean-up is itself interrupted; it used to print two
    KeyboardInterrupt tracebacks after kcp's line. A process that goes on after the block (a notebook
    calling cli.main) keeps Python's own handler, for its next command's Ctrl-C."""
    kept = ("import os, signal, sys\n"
            "from kcp.core.quiet import filtered_stderr\n"
            "with filtered_stderr():\n"
            "    try:\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "        signal.pause()\n"
            "    except KeyboardInterrupt:\n"
            "        pass\n"
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)\n")
    result = subprocess.run([sys.executable, "-c", kept], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (0, "True\n"), result.stderr
    script = ("import os, signal, sys, time\n"
              "from kcp.core.quiet import filtered_stderr\n"
              "with filtered_stderr(hard_exit=True):\n"
              "    try:\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        time.sleep(30)\n"
              "    except KeyboardInterrupt:\n"
              "        print('kcp run: interrupted; run the same command again', file=sys.stderr, flush=True)\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n"
              "        time.sleep(30)\n"
              "print('not reached')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (130, ""), result.stderr
    assert result.stderr == "kcp run: interrupted; run the same command again\n"


def test_a_lost_peers_abort_records_are_routine_and_what_follows_them_is_not():
    """A multi_worker peer gone: the C++ runtime logs each aborted collective over several lines
    before the Python error that kcp answers in one line; a line after them that is not theirs passes."""
    from kcp.core.quiet import shown_lines

    record = [b"E0000 00:00:1795953603.294530   25733 ring_alg.cc:291] Aborting RingReduce with UNAVAILABLE: "
              b"recvmsg:Connection reset by peer",
              b"Additional GRPC error information from remote target /job:worker/replica:0/task:1 while calling "
              b"/tensorflow.WorkerService/RecvBuf:",
              b':UNKNOWN:Error received from peer  {grpc_message:"recvmsg:Connection reset by peer", grpc_status:14}',
              b"W0000 00:00:1795955722.390527   22216 local_rendezvous.cc:412] Local rendezvous is aborting with "
              b"status: UNAVAILABLE: Collective ops is aborted by: Error reported from /job:worker/task:1: The "
              b"following tasks are unhealthy (stopped sending heartbeats):",
              b"/job:worker/replica:0/task:1",
              b"The tasks have crashed. Check the task logs for an earlier error, or scheduler events (e.g. "
              b"preemption, eviction) to debug further.",
              b"The error could be from a previous operation. Restart your program to reset.",
              b"\t [[{{function_node __inference_one_step_on_data_3387}}{{node CollectiveReduceV2_14}}]]"]
    after = [b"/work/x.py:3: UserWarning: something else", b"kcp train: error: train.strategy: multi_worker lost"]
    assert shown_lines(record + after)[0] == after
    assert shown_lines([record[1], record[4]])[0] == [record[1], record[4]]  # not after an abort: shown
    # a record split across two reads of the pipe
    kept, state = shown_lines(record[:2])
    assert kept == [] and shown_lines(record[2:] + after, state)[0] == after


def test_the_console_script_prints_no_routine_native_lines(tmp_path):
    """`kcp preprocess` on Beam's worker processes and `kcp train` (TensorFlow's C++ start-up)
    print their results and none of the lines every run used to print."""
    from kcp.core.quiet import is_routine

    kcp = os.path.join(os.path.dirname(sys.executable), "kcp")
    run_dir = str(tmp_path / "run")
    commands = [[kcp, "preprocess", "--run-dir", run_dir, "--set", "data.limit=300", "--",
                 "--direct_num_workers=2", "--direct_running_mode=multi_processing"],
                [kcp, "train", "--run-dir", run_dir, "--set", "train.epochs=1"]]
    for command in commands:
        result = subprocess.run(command, capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr.decode()[-2000:]
        assert not [line for line in result.stderr.splitlines() if is_routine(line)]
        assert b"test accuracy" in result.stdout or b"train written" in result.stdout


@pytest.mark.parametrize("tf_config, message", [
    ('{"cluster": {', "TF_CONFIG: not JSON (Expecting property name enclosed in double quotes at character 13): "
                      "'{\"cluster\": {'"),
    ('{"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}}',
     "TF_CONFIG: a cluster of 2 workers but no 'task': give each replica its own {\"type\": ..., \"index\": ...}"),
    ('{"cluster": {"worker": ["127.0.0.1:1"]}, "task": {"type": "worker", "index": 5}}',
     'TF_CONFIG: task {"type": "worker", "index": 5} is not in the cluster (worker: 1)'),
    # TensorFlow's evaluator, outside the cluster (a KeyError in TensorFlow) or in it (it trained a model of its own)
    ('{"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"]}, "task": {"type": "evaluator", "index": 0}}',
     "TF_CONFIG: task type 'evaluator' does not train: multi_worker training runs 'chief' and 'worker' tasks (kcp "
     "evaluates every split itself after fit); start this task as one of them, or not at all"),
    ('{"cluster": {"chief": ["127.0.0.1:1"], "worker": ["127.0.0.1:2"], "evaluator": ["127.0.0.1:3"]}, '
     '"task": {"type": "evaluator", "index": 0}}',
     "TF_CONFIG: task type 'evaluator' does not train: multi_worker training runs 'chief' and 'worker' tasks (kcp "
     "evaluates every split itself after fit); start this task as one of them, or not at all"),
])
def test_a_bad_tf_config_is_one_line_not_a_traceback_or_another_task(digits_run, monkeypatch, capsys, tf_config,
                                                                      message):
    """A launcher's TF_CONFIG that is not JSON ended in a JSONDecodeError traceback; a task missing or
    outside the cluster ran silently as worker-0 or worker-5."""
    monkeypatch.setenv("TF_CONFIG", tf_config)
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", digits_run, "--set", "train.epochs=1"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"kcp train: error: {message}"

