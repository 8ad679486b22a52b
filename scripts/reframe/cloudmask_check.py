"""ReFrame test of the CloudMask benchmark (cloudmask-bench), for HPC centres' regression and acceptance suites.

    reframe -c scripts/reframe/cloudmask_check.py -r                       # your site config, every partition
    reframe -c scripts/reframe/cloudmask_check.py -r -S cloudmask_cmd="apptainer run --nv cloudmask.sif" \\
            -S data=/scratch/cloudmask -S target=0.88                     # container, real data, a quality target

One run of ``cloudmask bench`` (``cloudmask train`` with ``-S mode=train``) in the test's stage directory, then
``cloudmask check-log``: the sanity check is that the run's MLPerf log passes the shipped ruleset. Performance
variables, read from the run's results.json: time per epoch, training patches/s, test accuracy, GPU energy per
epoch, time to the quality target (nan where not measured: no GPU, no target). Set per-system references
with ``-S reference=...`` or in a derived class; repeats: ReFrame's ``--repeat N`` with ``-S seed=...`` per run,
or a job array of ``slurm/train.sh`` outside ReFrame.
"""

import math
import os

import reframe as rfm
import reframe.utility.sanity as sn
import reframe.utility.typecheck as typ
from reframe.core.builtins import run_before, sanity_function, variable

# What the post-run step prints from results.json, one "cloudmask-perf NAME VALUE" line each (nan when null).
FIELDS = {
    "time_per_epoch": ("timing", "time_per_epoch_s"),
    "patches_per_s": ("timing", "samples_per_s"),
    "test_accuracy": ("test", "avg_accuracy"),
    "energy_per_epoch": ("energy", "gpu", "per_epoch_j"),
    "time_to_target": ("target", "time_to_target_s"),
}
UNITS = {"time_per_epoch": "s", "patches_per_s": "patches/s", "test_accuracy": "", "energy_per_epoch": "J",
         "time_to_target": "s"}
PRINT = ("import json, math, sys; r = json.load(open(sys.argv[1]))\n"
         "def get(keys):\n"
         "    v = r\n"
         "    for k in keys: v = (v or {}).get(k)\n"
         "    if isinstance(v, list): v = max(v) if keys[-1] == 'samples_per_s' else sum(v) / len(v) if v else None\n"
         "    return float('nan') if v is None else v\n"
         f"for name, keys in {FIELDS!r}.items(): print('cloudmask-perf', name, get(keys))\n")


@rfm.simple_test
class CloudMaskBenchmark(rfm.RunOnlyRegressionTest):
    descr = "MLCommons Science CloudMask (cloudmask-bench): time per epoch, patches/s, accuracy, energy"
    valid_systems = ["*"]
    valid_prog_environs = ["*"]
    cloudmask_cmd = variable(str, value="cloudmask")  # or e.g. "apptainer run --nv /path/cloudmask.sif"
    mode = variable(str, value="bench")  # bench: the short preset (synthetic data unless data is set); train
    data = variable(str, value="")  # dataset root ('' = bench's synthetic data)
    seed = variable(int, value=1234)
    epochs = variable(int, value=0)  # 0: the mode's default
    target = variable(float, value=0.0)  # train.target.value for val_accuracy (0 = no target)
    extra_sets = variable(typ.List[str], value=[])  # more config overrides, e.g. ["model.filters=4"]
    python = variable(str, value="python3")  # reads results.json after the run
    num_tasks = 1
    time_limit = "2h"
    tags = {"cloudmask", "mlcommons-science", "benchmark"}
    reference = {"*": {name: (None, None, None, unit) for name, unit in UNITS.items()}}

    @run_before("run")
    def set_command(self):
        sets = [f"seed={self.seed}", *self.extra_sets]
        if self.epochs:
            sets.append(f"train.epochs={self.epochs}")
        if self.target:
            sets.append(f"train.target.value={self.target}")
        args = [self.mode, "--out", "run", *(a for kv in sets for a in ("--set", kv))]
        if self.data:
            args += ["--data", self.data]
        self.executable = self.cloudmask_cmd
        self.executable_opts = args
        self.postrun_cmds = [f"{self.cloudmask_cmd} check-log run",
                             f"{self.python} -c {_quote(PRINT)} run/results.json"]

    @sanity_function
    def mlperf_log_passes(self):
        return sn.all([sn.assert_found(r"^PASS: run", self.stdout),
                       sn.assert_found(r"^cloudmask-perf time_per_epoch", self.stdout)])

    @run_before("performance")
    def measured_variables(self):
        """One performance variable per figure the run measured (a CPU run has no GPU energy, a run without a
        target no time to it: those are left out instead of failing their references as nan)."""
        stdout = os.path.join(self.stagedir, sn.evaluate(self.stdout))  # hooks do not run in the stage directory
        lines = sn.evaluate(sn.extractall(r"^cloudmask-perf (\S+) (\S+)", stdout, (1, 2), (str, float)))
        measured = {name for name, value in lines if not math.isnan(value)}
        self.perf_variables = {name: sn.make_performance_function(self._value(name), unit)
                               for name, unit in UNITS.items() if name in measured}

    def _value(self, name):
        return sn.extractsingle(rf"^cloudmask-perf {name} (\S+)", self.stdout, 1, float)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
