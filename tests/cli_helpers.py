"""What the end-to-end tests of bin/train.py and bin/adapt.py share: a tiny run's flags,
running a binary in-process, and a finished run to adapt from."""
import pytest
import tf_keras
from absl import flags as absl_flags

from wa_tf.training import flags as wa_flags
from wa_tf.training import train_lib
from wa_tf.training.config import RunConfig

TINY = ["--dataset=digits", "--mult=0.125", "--steps_per_epoch=2"]


def run_cli(program, argv, capsys):
    """Runs a binary's flag parsing and main in-process; returns (exit code, stderr)."""
    values = absl_flags.FlagValues()
    wa_flags.define_flags(values)
    fn = train_lib.run if program == "train" else train_lib.adapt
    with pytest.raises(SystemExit) as exit_info:
        wa_flags.parse_argv([program] + argv, values)
        wa_flags.run_main(fn, program, values)
    return exit_info.value.code, capsys.readouterr().err


def make_source_run(tmp_path_factory):
    """A finished INT8 normal-convolution run (lr 0.002, seed 3) to adapt from."""
    out = tmp_path_factory.mktemp("source") / "runs"
    config = RunConfig(conv="normal", quantize=True, dataset="digits", width_multiplier=0.125,
                       epochs=1, steps_per_epoch=2, lr=0.002, seed=3, out_dir=str(out))
    result = train_lib.run(config)
    tf_keras.backend.clear_session()
    return str(out), result["model_dir"]
