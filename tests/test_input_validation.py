"""Bad input is refused before any work, with one line that names the problem and the fix, and exit code 2.

Each case here used to be ignored silently, or to end in a traceback (see the comment on each test).
"""

import json

import pytest
from conftest import fast_overrides

from gptrain.cli import main
from gptrain.config import build_config
from gptrain.errors import UserError
from gptrain.model import PRESETS

TINY = ["--n-layers", "2", "--n-heads", "2", "--d-model", "32", "--max-position-embeddings", "32",
        "--batch-size", "2", "--num-steps", "2", "--eval-tokens", "256", "--progress", "plain"]


def refused(capsys, *args) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one line on stderr. Returns that line."""
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err.removeprefix("error: ").rstrip("\n")


def train_refused(capsys, dataset, tmp_path, *extra) -> str:
    """`gptrain train` on the test dataset is refused before the run folder exists."""
    message = refused(capsys, "train", "--data", dataset, "--runs-dir", tmp_path / "runs", "--run-name", "x",
                      *TINY, *extra)
    assert not (tmp_path / "runs").exists()
    return message


# ---------------------------------------------------------------------------------------- train: data
@pytest.mark.parametrize("extra, flags", [
    (["--tokenizer-name", "gpt2"], "--tokenizer-name would be ignored. Drop it"),
    (["--val-ratio", "0.1", "--max-tokens", "1000", "--line-docs"],
     "--val-ratio, --max-tokens, --line-docs would be ignored. Drop them"),
    (["--use-toy-data"], "--use-toy-data would be ignored. Drop it"),
    (["--train-data", "a.txt", "--val-data", "b.txt", "--text-field", "body"],
     "--train-data, --val-data, --text-field would be ignored. Drop them"),
])
def test_prepared_dataset_refuses_raw_data_settings(byte_dataset, tmp_path, capsys, extra, flags):
    # Was: data/dataset.py returned early and the settings were dropped (config.json still showed the tokenizer).
    assert train_refused(capsys, byte_dataset, tmp_path, *extra) == (
        f"--data {byte_dataset} is a prepared dataset (its tokenizer and validation split were fixed by `gptrain "
        f"prepare`), so {flags}, or drop --data to prepare raw files with --train-data instead.")


def test_prepared_dataset_refuses_raw_data_settings_from_a_config_file(byte_dataset, tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('[data]\ntokenizer = "byte"\n')
    assert "so --tokenizer-name would be ignored" in train_refused(capsys, byte_dataset, tmp_path, "--config", toml)


def test_toy_data_and_train_data_together_are_refused(tmp_path, capsys):
    # Was: trained on the toy corpus and dropped --train-data.
    message = refused(capsys, "train", "--use-toy-data", "--train-data", tmp_path / "corpus.txt", "--runs-dir",
                      tmp_path / "runs")
    assert message == "--use-toy-data and --train-data both choose the training text. Pass one of them."
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------- train: settings
@pytest.mark.parametrize("extra, message", [
    # Was: trained with a negative learning rate at the end of the schedule.
    (["--lr", "3e-4", "--min-lr", "-0.01"], "--min-lr must be ≥ 0, got -0.01."),
    (["--lr", "3e-4", "--min-lr", "0.001"], "--min-lr 0.001 is above --lr (0.0003); use a value between 0 and --lr "
                                            "(0.0003)."),
    # Were: a ValueError traceback from torch.optim.AdamW.
    (["--beta1", "2"], "--beta1 must be in [0, 1), got 2."),
    (["--beta2", "1.5"], "--beta2 must be in [0, 1), got 1.5."),
    (["--adam-eps", "-1"], "--adam-eps must be positive, got -1."),
    (["--adam-eps", "0"], "--adam-eps must be positive, got 0."),
    # Were: negative values treated as "off" (or, for weight decay, as a negative decay).
    (["--grad-clip", "-1"], "--grad-clip must be ≥ 0 (0: no clipping), got -1."),
    (["--weight-decay", "-1"], "--weight-decay must be ≥ 0 (0: no decay), got -1."),
    (["--eval-every", "-1"], "--eval-every must be ≥ 0 (0: at the end only), got -1."),
    (["--save-every", "-1"], "--save-every must be ≥ 0 (0: at the end only), got -1."),
    (["--sample-tokens", "-1"], "--sample-tokens must be ≥ 0 (0: no samples), got -1."),
    # One sample length (--sample-new-tokens is the original tool's name for it).
    (["--sample-new-tokens", "-1"], "--sample-tokens must be ≥ 0 (0: no samples), got -1."),
    # Were: accepted, then NaN weights (issue 18).
    (["--lr", "inf"], "--lr must be a finite number, got inf."),
    (["--lr", "nan"], "--lr must be a finite number, got nan."),
    (["--grad-clip", "inf"], "--grad-clip must be a finite number, got inf."),
    (["--pad-vocab-multiple", "0"], "--pad-vocab-multiple must be at least 1 (1: no padding), got 0."),
    (["--pad-vocab-multiple", "-1"], "--pad-vocab-multiple must be at least 1 (1: no padding), got -1."),
    (["--loss-chunk-size", "-1"], "--loss-chunk-size must be ≥ 0 (0: off), got -1."),
    # The chunked loss reads the head's weight whole; tensor parallel splits it over the ranks.
    (["--loss-chunk-size", "512", "--tp", "2"], "--loss-chunk-size does not work with tensor parallel: the LM "
                                                "head's weight is split over the ranks there. Drop one of the two."),
    # Its fp16 gradient products come before the scaler's factor and could overflow beyond its help.
    (["--loss-chunk-size", "512", "--precision", "fp16"], "--loss-chunk-size does not work with --precision fp16: "
     "its gradient products are made in fp16 before the gradient scaler's factor and can overflow where the "
     "scaler cannot help. Use --precision bf16, or --loss-chunk-size 0."),
    # Was: nothing recorded, nothing said.
    (["--use-profiler"], "--use-profiler needs 10 steps for one profiling cycle (--profile-wait 5 + "
                         "--profile-warmup 2 + --profile-active 3), but --num-steps is 2. Raise --num-steps to at "
                         "least 10, or lower --profile-wait and --profile-warmup."),
])
def test_out_of_range_settings_are_refused_before_training(byte_dataset, tmp_path, capsys, extra, message):
    assert train_refused(capsys, byte_dataset, tmp_path, *extra) == message


def test_a_profiler_cycle_that_fits_is_accepted():
    from gptrain.config import validate

    cfg, _ = build_config({"train.num_steps": 6, "profile.enabled": True, "profile.wait": 1, "profile.warmup": 2,
                           "profile.active": 3})
    validate(cfg)  # exactly one cycle: fine
    cfg.train.num_steps = 5
    with pytest.raises(UserError, match="needs 6 steps for one profiling cycle"):
        validate(cfg)


@pytest.mark.parametrize("toml, message", [
    # Was: int(True) == 1, a one-layer model.
    ("[model]\nn_layers = true\n", "setting 'model.n_layers' expects int, got true."),
    ("[optim]\nlr = false\n", "setting 'optim.lr' expects float, got false."),
])
def test_toml_booleans_are_not_numbers(tmp_path, capsys, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert refused(capsys, "train", "--config", path, "--runs-dir", tmp_path / "runs") == message


def test_wandb_settings_without_wandb_are_named_in_a_warning(tmp_path):
    # Was: ignored silently. A warning, like --nvtx on CPU: a shared --config file may hold W&B settings.
    from gptrain.tracking import build_trackers

    class Console:
        def __init__(self):
            self.warnings = []

        def print(self, line=""):
            pass

        def warn(self, message):
            self.warnings.append(message)

    def warnings_for(overrides):
        cfg, _ = build_config(overrides)
        console = Console()
        build_trackers(cfg, tmp_path, "id", None, console).finish("finished")
        return console.warnings

    assert warnings_for({"tracking.wandb_project": "p", "tracking.wandb_tags": ["a"]}) == [
        "W&B is off for this run (no --use-wandb or --trackers wandb), so --wandb-project, --wandb-tags do nothing. "
        "Add --use-wandb to stream the run to W&B."]
    assert warnings_for({"tracking.wandb_mode": "disabled", "tracking.wandb_project": "p"}) == [
        "W&B is off for this run (no --use-wandb or --trackers wandb), so --wandb-project does nothing. Add "
        "--use-wandb to stream the run to W&B."]
    assert warnings_for({"tracking.wandb_mode": "disabled"}) == []  # says W&B is off, which it is
    assert warnings_for({"tracking.use_wandb": True, "tracking.wandb_mode": "disabled",
                         "tracking.wandb_project": "p"}) == []


# ---------------------------------------------------------------------------------------- argparse
@pytest.mark.parametrize("args, message", [
    # Were: ~56 lines of usage before the error.
    (["train", "--preset", "nope"], "argument --preset/--model: invalid choice: 'nope' (choose from "
                                    f"{', '.join(repr(p) for p in PRESETS)}). See `gptrain train --help`."),
    (["train", "--lr"], "argument --lr/--learning-rate: expected one argument. See `gptrain train --help`."),
    (["generate"], "the following arguments are required: RUN_DIR_OR_CHECKPOINT. See `gptrain generate --help`."),
    (["bench", "--windows", "two"], "argument --windows: invalid int value: 'two'. See `gptrain bench --help`."),
])
def test_usage_errors_are_one_line(capsys, args, message):
    assert refused(capsys, *args) == message


# ---------------------------------------------------------------------------------------- generate / eval / plot
@pytest.fixture(scope="module")
def tiny_run(byte_dataset, tmp_path_factory):
    from gptrain.trainer import train

    runs = tmp_path_factory.mktemp("runs")
    cfg, explicit = build_config(fast_overrides(byte_dataset, runs, **{
        "train.run_name": "r", "train.num_steps": 1, "train.eval_every": 0, "train.sample_tokens": 0}))
    assert train(cfg, explicit).status == "finished"
    return runs / "r"


@pytest.mark.parametrize("extra, message", [
    # Were: tracebacks (top-k), exit 0 with nothing (tokens, samples), greedy decoding (temperature).
    (["--top-k", "0"], "--top-k must be at least 1, got 0 (leave it out for no top-k filter)."),
    (["--top-k", "-1"], "--top-k must be at least 1, got -1 (leave it out for no top-k filter)."),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be at least 1, got -5."),
    (["--num-samples", "0"], "--num-samples must be at least 1, got 0."),
    (["--temperature", "nan"], "--temperature must be a finite number ≥ 0 (0: greedy decoding), got nan."),
    (["--temperature", "-1"], "--temperature must be a finite number ≥ 0 (0: greedy decoding), got -1.0."),
])
def test_generate_refuses_bad_sampling_options_before_loading(tmp_path, capsys, extra, message):
    assert refused(capsys, "generate", tmp_path / "no-such-run", *extra) == message


def test_generate_says_when_the_context_caps_the_output(tiny_run, capsys):
    # Was: silently capped at context - prompt.
    assert main(["generate", str(tiny_run), "--prompt", "the", "--max-new-tokens", "100", "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ("note: the model's context is 32 tokens and the prompt takes 3, so at most 29 new tokens "
                            "are generated (--max-new-tokens 100)\n")
    assert captured.out.startswith("the") and len(captured.out) <= len("the") + 29 + 1  # bytes: one char per token
    assert main(["generate", str(tiny_run), "--prompt", "the", "--max-new-tokens", "29"]) == 0
    assert capsys.readouterr().err == ""
    assert refused(capsys, "generate", tiny_run, "--prompt", "x" * 40) == (
        "the prompt is 40 tokens, which fills the model's context (32 tokens): no new token fits. "
        "Shorten the prompt.")


@pytest.mark.parametrize("extra, message", [
    # Were: nan and exit 0 (-1); the run's own value, silently (0).
    (["--batch-size", "-1"], "--batch-size must be at least 1, got -1 (leave it out to use the run's own)."),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0 (leave it out to use the run's own)."),
    (["--eval-tokens", "0"], "--max-tokens must be at least 1, got 0 (leave it out to use the run's own)."),
])
def test_eval_refuses_non_positive_budgets(tmp_path, capsys, extra, message):
    assert refused(capsys, "eval", tmp_path / "no-such-run", *extra) == message


@pytest.mark.parametrize("out, what", [("p.txt", "a .txt image"), ("p", "an image without a suffix")])
def test_plot_checks_the_image_format_before_plotting(tmp_path, capsys, out, what):
    # Was: matplotlib's ValueError traceback after the figure was drawn.
    pytest.importorskip("matplotlib")
    message = refused(capsys, "plot", tmp_path / "no-such-run", "-o", tmp_path / out)
    assert message.startswith(f"-o {tmp_path / out}: matplotlib cannot write {what}. Name the file with one of its "
                              "formats: ")
    assert "png, " in message and message.endswith(f"(e.g. -o {tmp_path / 'p.png'}).")


# ---------------------------------------------------------------------------------------- bench
BENCH = ["bench", "--named", "smoke", "--device", "cpu", "--windows", "1", "--window-steps", "1",
         "--warmup-windows", "0", "--matmul-size", "64"]


@pytest.mark.parametrize("extra, message", [
    # Were: overwritten or dropped silently.
    (["--num-steps", "50", "--data", "d", "--use-wandb", "--run-name", "r"],
     "gptrain bench runs the training loop on synthetic data, with its own step counts (--windows, --window-steps) "
     "and no evaluation, checkpoints or trackers, so --num-steps, --data, --use-wandb, --run-name would be ignored. "
     "Drop them."),
    (["--eval-every", "5"], "gptrain bench runs the training loop on synthetic data, with its own step counts "
     "(--windows, --window-steps) and no evaluation, checkpoints or trackers, so --eval-every would be ignored. "
     "Drop it."),
    # Were: ZeroDivisionError, RuntimeError, and a message naming --num-steps.
    (["--matmul-size", "0"], "--matmul-size must be at least 1, got 0."),
    (["--matmul-size", "-5"], "--matmul-size must be at least 1, got -5."),
    (["--window-steps", "0"], "--window-steps must be at least 1, got 0."),
    (["--use-profiler"], "--use-profiler needs 10 steps for one profiling cycle (--profile-wait 5 + "
     "--profile-warmup 2 + --profile-active 3), but the benchmark runs 1 ((--warmup-windows 0 + --windows 1) × "
     "--window-steps 1). Raise --windows or --window-steps, or lower the profile settings."),
])
def test_bench_refuses_what_it_would_ignore_or_fail_on(capsys, extra, message):
    assert refused(capsys, *BENCH, *extra) == message


def test_bench_creates_the_json_folder_and_names_config_file_settings_it_ignores(tmp_path, capsys):
    # Was: FileNotFoundError after the whole benchmark ran. A --config file may be a training file: its
    # settings bench does not use are named in a note rather than refused.
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nnum_steps = 5000\n[data]\ntokenizer = "byte"\n')
    out = tmp_path / "new" / "dir" / "bench.json"
    assert main([*BENCH, "--config", str(toml), "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert err == (f"note: bench ignores these settings of {toml}: data.tokenizer, train.num_steps (synthetic data, "
                   "its own step counts)\n")
    assert json.loads(out.read_text())[0]["windows"] == 1


@pytest.mark.parametrize("toml, message", [
    # Was: accepted silently (only argparse checked choices).
    ('[train]\nprogress = "anything"\n', "--progress: 'anything' is not one of auto, bar, plain."),
    ('[optim]\nlr_scheduler = "cosin"\n', "--lr-scheduler: 'cosin' is not one of cosine, constant, wsd, linear. "
                                          "Did you mean 'cosine'?"),
    ('[optim]\nlr = inf\n', "--lr must be a finite number, got inf."),
])
def test_every_choice_and_bound_is_checked_in_toml_files_too(tmp_path, capsys, toml, message):
    path = tmp_path / "run.toml"
    path.write_text(toml)
    assert refused(capsys, "train", "--config", path, "--runs-dir", tmp_path / "runs") == message
    assert not (tmp_path / "runs").exists()
